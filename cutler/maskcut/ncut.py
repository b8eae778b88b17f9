"""MaskCut's Normalized Cut as pure batched functions over precomputed patch features.

Nothing here knows about ViTs: any ``(B, P, C)`` patch features on a ``h x w`` grid (``P = h * w``,
row-major) can be cut. Every function works on a batch of images at once, on the features' device.

The graph: ``A = [Fn Fn^T > tau]`` with ``eps`` for the zeros, ``D = diag(A 1)``;
the cut is the eigenvector ``x`` of the second smallest eigenvalue of ``(D - A) x = lambda D x``.
Equivalently ``x = D^-1/2 y`` with ``y`` the eigenvector of the second largest eigenvalue
``mu = 1 - lambda`` of ``S = D^-1/2 A D^-1/2``, whose largest eigenpair is known in closed form
(``mu = 1``, ``y1 ~ D^1/2 1``) and is deflated by the fast solver.

Two solvers share one interface (:func:`ncut_eigenvector`):

* ``"exact"``: the reference, float64 dense generalized ``scipy.linalg.eigh(D - A, D)`` per image
  (the published script's call; kept for tests and benchmarks).
* ``"fast"``: batched block Krylov (block Lanczos with full re-orthogonalisation and Rayleigh-Ritz,
  thick restarts) on the deflated ``S`` in float64 by default; images that do not converge fall back
  to a dense float64 ``eigh`` of ``S``, so the answer is always the exact one to ``tol``.

Where the published rule leaves the result to rounding, the default convention (``compat="default"``)
decides it, identically for every solver:

* the eigenvector's sign is canonical (``x[argmax |x|] > 0``): the published result depends on the
  arbitrary sign LAPACK returns when >= 3 grid corners are foreground and the peak is too;
* entries equal to the mean up to ``TIE_RTOL * max|x|`` are not foreground (what ``x > mean`` gives in
  exact arithmetic), and arg-max ties go to the lowest index;
* when ``lambda_3 - lambda_2 < gap_tol`` the second eigenvector is not defined (e.g. a uniform image:
  every non-trivial eigenvalue is equal) and the stage mask is empty instead of an arbitrary one.

``compat="published"`` instead repeats the published script's operations one for one (feature layout
and dtype per stage, the numpy threshold, the scipy call, LAPACK's sign, numpy's ``argmax``), so that on
the same machine and features its masks equal the published script's (:func:`published_eigenvectors`,
:func:`published_bipartition`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..structures.masks import mask_iou

# stage status codes (MaskCutOutput.status)
KEPT, EMPTY_SMALL, EMPTY_IOU, EMPTY_DEGENERATE = 0, 1, 2, 3
STATUS_NAMES = {KEPT: "kept", EMPTY_SMALL: "too_small", EMPTY_IOU: "overlaps_previous",
                EMPTY_DEGENERATE: "degenerate"}

# "default": our deterministic sign and tie conventions; "published": the published script's rounding
COMPAT_MODES = ("default", "published")

# eigenvector entries closer than this times max|x| count as equal (to the mean, or to the maximum):
# far above solver and BLAS noise (~1e-13 relative), far below the spread of entries of a real cut
TIE_RTOL = 1e-9


# ------------------------------------------------------------------------------------------ affinity
def normalize_features(feats: torch.Tensor) -> torch.Tensor:
    """``(B, P, C)`` -> L2-normalized per patch (float32); all-zero rows stay zero."""
    return F.normalize(feats.float(), p=2, dim=-1)


def cosine_similarity(feats: torch.Tensor) -> torch.Tensor:
    """``(B, P, C)`` features -> ``(B, P, P)`` float32 cosine similarities ``Fn Fn^T``."""
    f = normalize_features(feats)
    return torch.bmm(f, f.transpose(1, 2))


def binarize_affinity(sim: torch.Tensor, tau: float, eps: float = 1e-5, keep: Optional[torch.Tensor] = None,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Binary affinity ``A_ij = 1 if sim_ij > tau else eps``.

    Args:
        sim: ``(B, P, P)`` cosine similarities of the unmasked features.
        tau: threshold; eps: value of the "zero" entries.
        keep: ``(B, P)`` bool, False for patches masked by earlier stages. Their features count as
            zero, so their similarity to everything is 0 and their rows/columns become
            ``1 if 0 > tau else eps`` (all-eps for tau >= 0): identical to zeroing the features and
            recomputing ``Fn Fn^T``, without the matrix product.
        dtype: output dtype.

    Returns:
        ``(B, P, P)`` symmetric affinity.
    """
    one = torch.ones((), dtype=dtype, device=sim.device)
    small = torch.full((), eps, dtype=dtype, device=sim.device)
    a = torch.where(sim > tau, one, small)
    if keep is not None:
        masked_value = one if 0.0 > tau else small
        pair = keep[:, :, None] & keep[:, None, :]
        a = torch.where(pair, a, masked_value)
    return a


def affinity(feats: torch.Tensor, tau: float, eps: float = 1e-5, keep: Optional[torch.Tensor] = None,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Reference affinity: zero the masked features, normalize, ``Fn Fn^T``, binarize.

    Args:
        feats: ``(B, P, C)``; keep: ``(B, P)`` bool or None.

    Returns:
        ``(B, P, P)`` affinity in ``dtype``.
    """
    if keep is not None:
        feats = feats * keep[:, :, None].to(feats.dtype)
    return binarize_affinity(cosine_similarity(feats), tau, eps, None, dtype)


# ------------------------------------------------------------------------------------------- solvers
@dataclass
class EigenResult:
    """Second generalized eigenpair per image.

    x: ``(B, P)`` float64 eigenvector ``D^-1/2 y`` (D-normalized, canonical sign).
    eigvals: ``(B, 2)`` float64 ``(lambda_2, lambda_3)`` of ``(D - A) x = lambda D x``.
    iterations: ``(B,)`` int, block matrix products spent (0 for the exact solver, -1 = dense fallback).
    """

    x: torch.Tensor
    eigvals: torch.Tensor
    iterations: torch.Tensor

    def degenerate(self, gap_tol: float) -> torch.Tensor:
        """``(B,)`` bool: the second eigenvalue is (numerically) repeated, so x is not defined."""
        return (self.eigvals[:, 1] - self.eigvals[:, 0]) < gap_tol


def first_argmax(v: torch.Tensor, rtol: float = TIE_RTOL) -> torch.Tensor:
    """``(B, P)`` -> ``(B,)`` lowest index whose value is within ``rtol * max|v|`` of the row maximum.

    Patches masked by earlier stages have identical graph rows, hence (in exact arithmetic) equal
    eigenvector entries; a plain argmax would pick among them by rounding noise, which differs
    between solvers and BLAS builds. The lowest index makes the choice reproducible.
    """
    top = v.max(dim=1, keepdim=True).values
    scale = v.abs().max(dim=1, keepdim=True).values
    return (v >= top - rtol * scale).to(torch.uint8).argmax(dim=1)


def canonical_sign(x: torch.Tensor) -> torch.Tensor:
    """Flip each row of ``(B, P)`` ``x`` so that its entry of largest magnitude is positive."""
    peak = x.gather(1, first_argmax(x.abs())[:, None])
    return x * torch.where(peak < 0, -1.0, 1.0).to(x.dtype)


@dataclass
class BinaryGraph:
    """A binarized affinity kept as booleans: ``A = where(adj, 1, eps)`` without the float matrix.

    adj: ``(B, P, P)`` bool (symmetric); eps: value of the False entries.
    """

    adj: torch.Tensor
    eps: float

    @property
    def shape(self):
        return self.adj.shape

    @property
    def device(self):
        return self.adj.device

    def __getitem__(self, idx) -> "BinaryGraph":
        return BinaryGraph(self.adj[idx], self.eps)

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The ``(B, P, P)`` affinity matrix."""
        one = torch.ones((), dtype=dtype, device=self.adj.device)
        return torch.where(self.adj, one, torch.full((), self.eps, dtype=dtype, device=self.adj.device))

    def degrees(self) -> torch.Tensor:
        """``(B, P)`` float64 ``d = A 1`` from the counts of True entries."""
        count = self.adj.sum(dim=-1).to(torch.float64)  # integer count: exact, and faster than a float sum
        return count + self.eps * (self.adj.shape[-1] - count)


def binary_graph(sim: torch.Tensor, tau: float, eps: float = 1e-5, keep: Optional[torch.Tensor] = None) -> BinaryGraph:
    """:func:`binarize_affinity` as a :class:`BinaryGraph` (bool storage; the fast solver's input)."""
    adj = sim > tau
    if keep is not None:
        pair = keep[:, :, None] & keep[:, None, :]
        adj = (adj & pair) if not 0.0 > tau else (adj | ~pair)
    return BinaryGraph(adj, eps)


def _as_dense(a, dtype=torch.float64) -> torch.Tensor:
    return a.dense(dtype) if isinstance(a, BinaryGraph) else a.to(dtype)


def scipy_second_eigenpair(a: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The published script's solve: float64 ``scipy.linalg.eigh(D - A, D, subset_by_index=[1, 2])``.

    Args:
        a: ``(P, P)`` float64 C-contiguous affinity (the degrees are numpy's row sums of this array).

    Returns:
        (``(2,)`` eigenvalues ``lambda_2, lambda_3``, ``(P,)`` eigenvector of ``lambda_2``, D-normalized,
        with the sign LAPACK returns).
    """
    from scipy.linalg import eigh

    d = np.diag(np.sum(a, axis=1))
    w, v = eigh(d - a, d, subset_by_index=[1, 2])
    return w, v[:, 0]


def solve_exact(a, **_) -> EigenResult:
    """Reference solver: :func:`scipy_second_eigenpair` per image, then the canonical sign.

    Args:
        a: ``(B, P, P)`` affinity tensor or :class:`BinaryGraph` (any device; computed on the CPU).
    """
    xs, vals = [], []
    for ai in _as_dense(a).detach().cpu().numpy():
        w, x = scipy_second_eigenpair(ai)
        xs.append(x)
        vals.append(w)
    x = torch.from_numpy(np.stack(xs)).to(a.device)
    ev = torch.from_numpy(np.stack(vals)).to(a.device)
    return EigenResult(canonical_sign(x), ev, torch.zeros(a.shape[0], dtype=torch.long))


def _normalized_affinity(a, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``S = D^-1/2 A D^-1/2`` ``(B, P, P)``, ``d^-1/2`` ``(B, P)`` and the unit top eigenvector ``(B, P)``."""
    a = _as_dense(a, dtype)
    d = a.sum(dim=-1)
    dis = d.rsqrt()
    s = a * dis[:, :, None] * dis[:, None, :]
    v1 = d.sqrt()
    return s, dis, v1 / v1.norm(dim=-1, keepdim=True)


class _NormalizedOperator:
    """``X -> S X`` for ``S = D^-1/2 A D^-1/2`` on a batch, plus ``d^-1/2`` and the top eigenvector.

    For a :class:`BinaryGraph` the product is ``D^-1/2 ((1 - eps) C + eps 1 1^T) D^-1/2 X`` with the
    0/1 matrix ``C`` cast once to the working dtype: one pass over a P x P matrix per product and no
    scaled copy of A (the products are memory bound).
    """

    def __init__(self, a, dtype: torch.dtype):
        self.dtype = dtype
        if isinstance(a, BinaryGraph):
            d = a.degrees()
            self.c = a.adj.to(dtype)
            self.eps = a.eps
            self.s = None
        else:
            self.s, _, _ = _normalized_affinity(a, dtype)
            d = _as_dense(a, torch.float64).sum(dim=-1)
        self.dis64 = d.rsqrt()
        self.dis = self.dis64.to(dtype)
        v1 = d.sqrt()
        self.v1 = (v1 / v1.norm(dim=-1, keepdim=True)).to(dtype)

    def subset(self, idx: torch.Tensor) -> "_NormalizedOperator":
        out = object.__new__(_NormalizedOperator)
        out.__dict__.update({k: (v[idx] if torch.is_tensor(v) else v) for k, v in self.__dict__.items()})
        return out

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        if self.s is not None:
            return torch.bmm(self.s, x)
        z = self.dis[:, :, None] * x
        y = (1.0 - self.eps) * torch.bmm(self.c, z) + self.eps * z.sum(dim=1, keepdim=True)
        return self.dis[:, :, None] * y

    def dense(self) -> torch.Tensor:
        if self.s is not None:
            return self.s
        a = (1.0 - self.eps) * self.c + self.eps
        return a * self.dis[:, :, None] * self.dis[:, None, :]


def _orthonormalize(w: torch.Tensor, against: torch.Tensor) -> torch.Tensor:
    """Columns of ``(B, P, b)`` ``w`` made orthonormal and orthogonal to the orthonormal ``against``.

    Classical Gram-Schmidt twice ("twice is enough"), QR, then once more: QR of a rank-deficient
    block (an invariant subspace was found) returns arbitrary extra directions that must not re-enter
    the span already built.
    """
    for _ in range(2):
        w = w - against @ (against.transpose(1, 2) @ w)
    q = torch.linalg.qr(w).Q
    q = q - against @ (against.transpose(1, 2) @ q)
    return torch.linalg.qr(q).Q


def _rayleigh_ritz(q: torch.Tensor, sq: torch.Tensor):
    h = q.transpose(1, 2) @ sq
    theta, u = torch.linalg.eigh(0.5 * (h + h.transpose(1, 2)))
    vec, svec = q @ u[:, :, -2:], sq @ u[:, :, -2:]
    res = (svec[:, :, -1] - theta[:, -1:] * vec[:, :, -1]).norm(dim=1)
    return theta, u, res


def _block_krylov(op: _NormalizedOperator, x0: torch.Tensor, steps: int, tol: float, check_from: int = 3):
    """One cycle of block Lanczos on ``S`` deflated by its top eigenvector, with Rayleigh-Ritz.

    Stops early once every image's top Ritz pair has residual <= ``tol`` (checked every step from
    ``check_from``: the small projected problem is cheap next to a product with S).

    Returns (Ritz values ``(B, m)`` ascending, Ritz vectors ``(B, P, m)``, residuals ``(B,)``, steps used).
    """
    v1 = op.v1[:, :, None]
    blocks, products = [_orthonormalize(x0, v1)], []
    for j in range(steps):
        products.append(op @ blocks[-1])
        last = j + 1 == steps
        if j + 1 >= check_from or last:
            q, sq = torch.cat(blocks, dim=2), torch.cat(products, dim=2)
            theta, u, res = _rayleigh_ritz(q, sq)
            if last or bool((res <= tol).all()):
                return theta, q @ u, res, j + 1
        blocks.append(_orthonormalize(products[-1], torch.cat([v1] + blocks, dim=2)))
    raise AssertionError("unreachable")


def solve_fast(a, block: int = 4, steps: int = 24, max_restarts: int = 6, tol: float = 1e-9,
               dtype: torch.dtype = torch.float64, seed: int = 0, **_) -> EigenResult:
    """Batched deflated block-Krylov solver for the second eigenpair (see the module docstring).

    Args:
        a: ``(B, P, P)`` affinity tensor or :class:`BinaryGraph` (cheaper), on any device.
        block: block size b (>= 2: the third eigenvalue is needed for the degeneracy check).
        steps: most block products per cycle (Krylov dimension up to ``b * steps``).
        max_restarts: cycles (thick restarts from the best Ritz block) before the dense fallback.
        tol: residual ``||S y - mu y||`` (``||S|| = 1``) at which an eigenvector counts as converged.
        dtype: working precision (float64 by default: float32 visibly changes later-stage masks).
        seed: start block seed (fixed so that runs are reproducible).

    Returns:
        :class:`EigenResult` (``iterations`` = block products, -1 where the dense fallback ran).
    """
    bsz, p, _ = a.shape
    op = _NormalizedOperator(a, dtype)
    block = max(2, min(block, max(1, (p - 1) // 2)))
    steps = max(1, min(steps, (p - 1) // block))
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(p, block, generator=gen, dtype=torch.float64).to(device=a.device, dtype=dtype)
    x0 = x0.expand(bsz, p, block).contiguous()
    y = torch.zeros(bsz, p, dtype=dtype, device=a.device)
    mu = torch.zeros(bsz, 2, dtype=dtype, device=a.device)
    iters = torch.zeros(bsz, dtype=torch.long)
    active = torch.arange(bsz, device=a.device)
    for _cycle in range(max_restarts):
        if active.numel() == 0:
            break
        sub = op if active.numel() == bsz else op.subset(active)
        theta, vec, res, used = _block_krylov(sub, x0[active], steps, tol)
        y[active] = vec[:, :, -1]
        mu[active] = theta[:, [-1, -2]]
        iters[active.cpu()] += used
        done = res <= tol
        x0[active] = vec[:, :, -block:]  # thick restart from the best Ritz block
        active = active[~done]
    if active.numel():
        # rare (clustered spectra): exact answer by dense eigh of S for the stragglers
        w, v = torch.linalg.eigh(op.subset(active).dense().to(torch.float64))
        y[active] = v[:, :, -2].to(dtype)
        mu[active] = w[:, [-2, -3]].to(dtype)
        iters[active.cpu()] = -1
    x = canonical_sign(op.dis64 * y.to(torch.float64))
    return EigenResult(x, 1.0 - mu.to(torch.float64), iters)


def solve_dense(a, dtype: torch.dtype = torch.float64, **_) -> EigenResult:
    """Batched dense ``torch.linalg.eigh`` of ``S`` (float64): exact, on the device, O(P^3)."""
    s, dis, _ = _normalized_affinity(a, dtype)
    w, v = torch.linalg.eigh(s)
    x = canonical_sign(dis.to(torch.float64) * v[:, :, -2].to(torch.float64))
    ev = 1.0 - w[:, [-2, -3]].to(torch.float64)
    return EigenResult(x, ev, torch.full((a.shape[0],), -1, dtype=torch.long))


SOLVERS: Dict[str, Callable[..., EigenResult]] = {"exact": solve_exact, "fast": solve_fast, "dense": solve_dense}


def ncut_eigenvector(a, solver: str = "fast", **kwargs) -> EigenResult:
    """Second generalized eigenvector of ``(D - A) x = lambda D x`` for a batch ``(B, P, P)`` (a dense
    affinity tensor or a :class:`BinaryGraph`).

    ``solver``: ``"fast"`` (batched block Krylov), ``"exact"`` (scipy per image, the reference),
    ``"dense"`` (batched torch eigh); extra keyword arguments go to the solver.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown NCut solver '{solver}', expected one of {sorted(SOLVERS)}")
    return SOLVERS[solver](a, **kwargs)


# --------------------------------------------------------------------------------------- bipartition
def corner_indices(grid_hw: Tuple[int, int]) -> list:
    """Flat indices of the 4 grid corners (top-left, top-right, bottom-left, bottom-right)."""
    h, w = grid_hw
    return [0, w - 1, (h - 1) * w, h * w - 1]


def bipartition(x: torch.Tensor, grid_hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Foreground candidate and seed from the second eigenvector, with MaskCut's reverse rule.

    Args:
        x: ``(B, P)`` eigenvectors; grid_hw: ``(h, w)`` with ``h * w = P``.

    Returns:
        ``fg`` ``(B, P)`` bool and ``seed`` ``(B,)`` long. ``fg = x > mean(x)``, where entries within
        ``TIE_RTOL * max|x|`` of the mean count as equal to it (not foreground); it is reversed when >= 3
        corners are foreground or the peak ``argmax |x|`` is not foreground; the seed is then
        ``argmax(-x)``, else ``argmax(x)`` (ties, up to rounding, go to the lowest index).
    """
    scale = x.abs().max(dim=1, keepdim=True).values
    fg = x > x.mean(dim=1, keepdim=True) + TIE_RTOL * scale
    peak = first_argmax(x.abs())[:, None]
    corners = fg[:, corner_indices(grid_hw)].sum(dim=1)
    reverse = (corners >= 3) | ~fg.gather(1, peak)[:, 0]
    fg = torch.where(reverse[:, None], ~fg, fg)
    seed = torch.where(reverse, first_argmax(-x), first_argmax(x))
    return fg, seed


def published_affinity(feats: torch.Tensor, keep: Optional[torch.Tensor], tau: float, eps: float = 1e-5) -> np.ndarray:
    """One image's affinity computed with the published script's operations, in its order and dtypes.

    Args:
        feats: ``(P, C)`` float32 patch features.
        keep: ``(P,)`` bool, False for patches painted by earlier stages; None for the first stage.

    Returns:
        ``(P, P)`` float64 numpy affinity (1 or ``eps``). The features are laid out ``(C, P)``; the first
        stage normalizes and multiplies them in float32 on their device; later stages multiply them by
        the float64 painting complement first, so that stage's normalization and Gram matrix run in
        float64 (the published promotion), which decides other entries near ``tau`` than float32 would.
        The threshold is numpy's ``>`` on the CPU copy.
    """
    f = feats.t().contiguous()
    if keep is not None:
        f = keep.to(torch.float64)[None, :] * f
    f = F.normalize(f, p=2, dim=0)
    sim = (f.transpose(0, 1) @ f).cpu().numpy()
    return np.where(sim > tau, 1.0, eps)


def published_eigenvectors(feats: torch.Tensor, keep: Optional[torch.Tensor], tau: float,
                           eps: float = 1e-5) -> EigenResult:
    """Second generalized eigenpairs exactly as the published script computes them, image by image.

    Args:
        feats: ``(B, P, C)`` float32 features; keep: ``(B, P)`` bool or None (first stage), see
            :func:`published_affinity`.

    Returns:
        :class:`EigenResult` on the CPU: the eigenvectors of :func:`scipy_second_eigenpair` with LAPACK's
        sign (no canonical sign), their eigenvalues, zero iterations.
    """
    pairs = [scipy_second_eigenpair(published_affinity(feats[i], None if keep is None else keep[i], tau, eps))
             for i in range(feats.shape[0])]
    return EigenResult(torch.from_numpy(np.stack([x for _, x in pairs])),
                       torch.from_numpy(np.stack([w for w, _ in pairs])),
                       torch.zeros(feats.shape[0], dtype=torch.long))


def published_bipartition(x: torch.Tensor, grid_hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`bipartition` with the published rounding: no sign convention and no tie tolerance.

    ``fg = x > sum(x) / P`` (numpy's sum), the peak and the seeds are numpy's first ``argmax`` of the
    values as they are, and the reverse rule applies to whatever sign ``x`` has.

    Args:
        x: ``(B, P)`` float64 eigenvectors (any device); grid_hw: ``(h, w)``.

    Returns:
        ``fg`` ``(B, P)`` bool and ``seed`` ``(B,)`` long, on ``x``'s device.
    """
    corners = corner_indices(grid_hw)
    fgs, seeds = [], []
    for v in x.detach().cpu().numpy():
        fg = v > np.sum(v) / len(v)
        reverse = int(fg[corners].sum()) >= 3 or not fg[np.argmax(np.abs(v))]
        fgs.append(~fg if reverse else fg)
        seeds.append(np.argmax(-v if reverse else v))
    return (torch.from_numpy(np.stack(fgs)).to(x.device),
            torch.tensor(seeds, dtype=torch.long, device=x.device))


def convention_events(x: torch.Tensor, grid_hw: Tuple[int, int], eigvals: Optional[torch.Tensor] = None,
                      gap_tol: float = 1e-7) -> Dict[str, torch.Tensor]:
    """Which of the published script's rounding-decided choices the default conventions replace, per image.

    Args:
        x: ``(B, P)`` float64 eigenvectors with the sign the solver returned (e.g. the ``eigvecs`` of a
            ``compat="published"`` run); grid_hw: ``(h, w)``.
        eigvals: ``(B, 2)`` ``(lambda_2, lambda_3)`` or None (then ``"degenerate"`` is all False).

    Returns:
        ``(B,)`` bool (CPU) per rule:
        ``"sign"``: the peak is negative and the peak's side of the mean holds >= 3 grid corners, so the
        reverse rule keeps the other side than under the canonical sign;
        ``"mean_tie"``: entries within ``TIE_RTOL * max|x|`` of the mean split differently from ours
        (published: by rounding; ours: not foreground);
        ``"seed_tie"``: numpy's ``argmax`` for the peak or the seed is not the lowest index tied with it;
        ``"degenerate"``: ``lambda_3 - lambda_2 < gap_tol`` (ours: no mask; published: LAPACK's vector).
    """
    corners = corner_indices(grid_hw)
    out = {k: [] for k in ("sign", "mean_tie", "seed_tie")}
    for v in x.detach().cpu().numpy():
        tol = TIE_RTOL * np.abs(v).max()
        peak = int(np.argmax(np.abs(v)))
        fg = v > np.sum(v) / len(v)
        peak_side = fg if v[peak] > 0 else ~fg
        out["sign"].append(bool(v[peak] < 0 and peak_side[corners].sum() >= 3))
        ours = v > np.mean(v) + tol if v[peak] > 0 else v < np.mean(v) - tol  # the canonical frame's foreground
        out["mean_tie"].append(not (np.array_equal(fg, ours) or np.array_equal(fg, ~ours)))
        reverse = int(fg[corners].sum()) >= 3 or not fg[peak]
        seed_of = -v if reverse else v
        firsts = [int(np.flatnonzero(u >= u.max() - tol)[0]) for u in (np.abs(v), seed_of)]
        out["seed_tie"].append(firsts != [peak, int(np.argmax(seed_of))])
    events = {k: torch.tensor(b, dtype=torch.bool) for k, b in out.items()}
    events["degenerate"] = (torch.zeros(x.shape[0], dtype=torch.bool) if eigvals is None
                            else ((eigvals[:, 1] - eigvals[:, 0]) < gap_tol).cpu())
    return events


def label_components(mask: torch.Tensor, check_every: int = 4) -> torch.Tensor:
    """4-connected component labels of a batch of grids, identical to ``scipy.ndimage.label``.

    Args:
        mask: ``(B, h, w)`` bool.

    Returns:
        ``(B, h, w)`` long: 0 for background, components numbered 1, 2, ... in raster order of their
        first pixel (scipy's numbering). Min-label propagation over the 4 neighbours with pointer
        jumping (each label is the flat index + 1 of a pixel of the same component, so looking that
        pixel's label up is a valid shortcut), then ranks of the component roots.
    """
    b, h, w = mask.shape
    n = h * w
    big = n + 1
    idx = torch.arange(1, n + 1, device=mask.device).view(1, h, w).expand(b, h, w)
    lab = torch.where(mask, idx, torch.full_like(idx, big))
    while True:
        prev = lab
        for _ in range(check_every):
            pad = F.pad(lab, (1, 1, 1, 1), value=big)
            nb = torch.minimum(torch.minimum(pad[:, :-2, 1:-1], pad[:, 2:, 1:-1]),
                               torch.minimum(pad[:, 1:-1, :-2], pad[:, 1:-1, 2:]))
            lab = torch.where(mask, torch.minimum(lab, nb), lab)
            flat = lab.reshape(b, n)
            jumped = flat.gather(1, (flat.clamp(max=n) - 1)).view(b, h, w)
            lab = torch.where(mask, torch.minimum(lab, jumped), lab)
        if torch.equal(lab, prev):
            break
    flat = lab.reshape(b, n)
    roots = mask.reshape(b, n) & (flat == idx.reshape(b, n))
    rank = torch.cumsum(roots.long(), dim=1)
    out = rank.gather(1, flat.clamp(max=n) - 1)
    return torch.where(mask.reshape(b, n), out, torch.zeros_like(out)).view(b, h, w)


def seed_component(fg: torch.Tensor, seed: torch.Tensor, grid_hw: Tuple[int, int]) -> torch.Tensor:
    """The 4-connected component of ``fg`` containing ``seed``.

    Args:
        fg: ``(B, P)`` bool; seed: ``(B,)`` flat indices; grid_hw: ``(h, w)``.

    Returns:
        ``(B, P)`` bool. As in the reference (``objects == objects[seed]``), a seed outside ``fg`` has
        label 0 and selects all of the background.
    """
    b = fg.shape[0]
    labels = label_components(fg.view(b, *grid_hw)).view(b, -1)
    return labels == labels.gather(1, seed[:, None])


# ---------------------------------------------------------------------------------------- the stages
def stage_filter(cand: torch.Tensor, prev: torch.Tensor, stage: int, degenerate: Optional[torch.Tensor] = None,
                 min_area_fraction: float = 0.01, iou_thresh: float = 0.5) -> torch.Tensor:
    """Status of stage ``stage`` (0-based) candidates.

    Args:
        cand: ``(B, P)`` bool seed components; prev: ``(B, P)`` bool previous stage masks (already
            emptied where that stage was rejected, as in the reference); degenerate: ``(B,)`` bool or None.

    Returns:
        ``(B,)`` long: KEPT, or for stages >= 1 EMPTY_SMALL (area <= ``min_area_fraction`` of the grid)
        / EMPTY_IOU (IoU with ``prev`` > ``iou_thresh``); EMPTY_DEGENERATE wins over both.
    """
    st = torch.full((cand.shape[0],), KEPT, dtype=torch.long, device=cand.device)
    if stage > 0:
        small = cand.sum(dim=1).double() / cand.shape[1] <= min_area_fraction
        overlap = mask_iou(cand, prev) > iou_thresh
        st = torch.where(small, torch.full_like(st, EMPTY_SMALL), st)
        st = torch.where(overlap, torch.full_like(st, EMPTY_IOU), st)
    if degenerate is not None:
        st = torch.where(degenerate, torch.full_like(st, EMPTY_DEGENERATE), st)
    return st


def next_painting(painting: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, P)`` bool union of the kept masks so far; its complement is the ``keep`` of the next graph
    (:func:`binary_graph`), i.e. painted patches get all-eps rows."""
    return painting | mask


@dataclass
class MaskCutOutput:
    """Per-stage MaskCut results on the patch grid.

    masks: ``(B, N, h, w)`` bool stage masks ``M_t`` (empty where a stage filter fired).
    eigvecs: ``(B, N, P)`` float64 second eigenvectors ``x`` of each stage (canonical sign; LAPACK's with
        ``compat="published"``).
    status: ``(B, N)`` long, one of KEPT / EMPTY_SMALL / EMPTY_IOU / EMPTY_DEGENERATE.
    candidates: ``(B, N, h, w)`` bool seed components before the stage filters (for agreement checks).
    iterations: ``(B, N)`` long solver work per stage (-1 = dense).
    eigvals: ``(B, N, 2)`` float64 ``(lambda_2, lambda_3)`` of each stage's graph.
    """

    masks: torch.Tensor
    eigvecs: torch.Tensor
    status: torch.Tensor
    candidates: torch.Tensor
    iterations: torch.Tensor
    eigvals: Optional[torch.Tensor] = None


def maskcut_patches(feats: torch.Tensor, grid_hw: Tuple[int, int], n_stages: int = 3, tau: float = 0.15,
                    eps: float = 1e-5, solver: str = "fast", min_area_fraction: float = 0.01,
                    stage_iou_thresh: float = 0.5, gap_tol: float = 1e-7,
                    solver_kwargs: Optional[dict] = None, compat: str = "default") -> MaskCutOutput:
    """MaskCut on patch features: ``n_stages`` masked NCuts per image, batched.

    Args:
        feats: ``(B, P, C)`` patch features, ``P = h * w`` row-major.
        grid_hw: ``(h, w)``.
        n_stages: N; tau, eps: affinity binarization.
        solver: see :func:`ncut_eigenvector`.
        min_area_fraction: stage t >= 2 masks covering <= this fraction of the grid are emptied.
        stage_iou_thresh: stage t >= 2 masks with IoU > this against the previous stage's mask are emptied.
        gap_tol: ``lambda_3 - lambda_2`` below which the cut is undefined and the stage mask empty.
        compat: ``"default"`` (our sign and tie conventions, any solver) or ``"published"``: the published
            script's operations (:func:`published_eigenvectors`, :func:`published_bipartition`); ``solver``,
            ``solver_kwargs`` and ``gap_tol`` are then unused and ``eigvecs`` keep LAPACK's sign.

    Returns:
        :class:`MaskCutOutput`. Patches under a kept mask are masked out of the next stages' graph
        (their rows become all-eps). A stage whose graph is unchanged (the previous stage was
        emptied) reuses the previous eigenvector instead of solving the same problem again.
    """
    b, p, _ = feats.shape
    h, w = grid_hw
    if h * w != p:
        raise ValueError(f"grid {h}x{w} does not match {p} patches")
    if compat not in COMPAT_MODES:
        raise ValueError(f"unknown maskcut.compat '{compat}', expected one of {COMPAT_MODES}")
    published = compat == "published"
    kw = dict(solver_kwargs or {})
    sim = None if published else cosine_similarity(feats)
    dev = feats.device
    painting = torch.zeros(b, p, dtype=torch.bool, device=dev)
    prev = torch.zeros(b, p, dtype=torch.bool, device=dev)
    changed = torch.ones(b, dtype=torch.bool, device=dev)
    x = torch.zeros(b, p, dtype=torch.float64, device=dev)
    lam = torch.zeros(b, 2, dtype=torch.float64, device=dev)
    degenerate = torch.zeros(b, dtype=torch.bool, device=dev)
    iters_prev = torch.zeros(b, dtype=torch.long)
    masks, eigvecs, status, cands, iters, lams = [], [], [], [], [], []
    for t in range(n_stages):
        todo = changed.nonzero()[:, 0]
        it = torch.zeros(b, dtype=torch.long)
        if todo.numel() and published:
            # stage 1 cuts the float32 features, later stages the painted ones (float64 in the published script)
            res = published_eigenvectors(feats[todo], None if t == 0 else ~painting[todo], tau, eps)
            x[todo], lam[todo] = res.x.to(dev), res.eigvals.to(dev)
        elif todo.numel():
            sub = todo.numel() < b
            graph = binary_graph(sim[todo] if sub else sim, tau, eps, ~(painting[todo] if sub else painting))
            res = ncut_eigenvector(graph, solver, **kw)
            del graph
            x[todo], lam[todo] = res.x.to(dev), res.eigvals.to(dev)
            degenerate[todo] = res.degenerate(gap_tol).to(dev)
            it[todo.cpu()] = res.iterations
        unchanged = (~changed).cpu()
        it[unchanged] = iters_prev[unchanged]
        fg, seed = (published_bipartition if published else bipartition)(x, grid_hw)
        cand = seed_component(fg, seed, grid_hw) & ~degenerate[:, None]  # no candidate without a defined cut
        st = stage_filter(cand, prev, t, degenerate, min_area_fraction, stage_iou_thresh)
        mask = cand & (st == KEPT)[:, None]
        painting = next_painting(painting, mask)
        changed = mask.any(dim=1)
        prev = mask
        iters_prev = it
        masks.append(mask.view(b, h, w))
        eigvecs.append(x.clone())
        lams.append(lam.clone())
        status.append(st)
        cands.append(cand.view(b, h, w))
        iters.append(it)
    return MaskCutOutput(torch.stack(masks, 1), torch.stack(eigvecs, 1), torch.stack(status, 1),
                         torch.stack(cands, 1), torch.stack(iters, 1), torch.stack(lams, 1))


def upsample_stage_masks(masks: torch.Tensor, size_hw: Tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour upsampling of stage masks, made disjoint.

    Args:
        masks: ``(B, N, h, w)`` bool patch-grid masks; size_hw: ``(H, W)`` resized image size.

    Returns:
        ``(B, N, H, W)`` bool; stage t keeps only pixels not covered by stages ``< t``.
    """
    up = F.interpolate(masks.float(), size=tuple(size_hw), mode="nearest") > 0.5
    earlier = torch.cumsum(up.int(), dim=1) - up.int()
    return up & (earlier == 0)
