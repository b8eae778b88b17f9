"""Bottom-up iterative merging of adjacent patch clusters (UnSAM's conquer step), batched over crops.

The algorithm, for one crop with patch features ``k_p`` on an ``h x w`` grid and thresholds
``theta_1 > theta_2 > ...`` (finest first):

* every patch starts as its own cluster; a cluster's feature is the size-weighted mean of its patches'
  features (equivalently their sum: cosine similarity does not see the scale);
* repeatedly take the pair of ADJACENT clusters (4-neighbourhood on the patch grid) with the highest cosine
  similarity; if it is below the current threshold, stop this level, else merge the pair;
* the partition when level ``t`` stops is ``S_t``; the next threshold continues from it.

Two choices make "the same hierarchy" a checkable statement rather than a floating-point accident:

* **Exact arithmetic.** Features are quantized to integers (:func:`quantize_features`), with a bound chosen so
  that every cluster-sum dot product is an integer below 2**53: they are exact in float64 whatever the order
  of summation (matrix products, incremental updates, a sequential loop). The similarity of two clusters is
  then ``dot / sqrt(|a|^2 * |b|^2)`` computed from those exact integers with IEEE float64 operations
  (correctly rounded on every device), 0 when a cluster sum is zero.
* **A total order of pairs.** Ties in similarity go to the pair whose smaller cluster id is smallest, then
  whose larger cluster id is smallest, where a cluster's id is the smallest (row-major) patch index it holds.
  The id does not depend on the merge order, so the choice among equal similarities is the same in any
  implementation.

:func:`iterative_merge` runs one merge per crop per round, every crop of a batch in lock step, on tensors:
per round it gathers the similarities of all patch-grid edges from a maintained Gram matrix of cluster sums,
takes each crop's maximum under the total order above, and applies the merge to the Gram matrix (a row and a
column update) and to the label map. Each crop therefore performs exactly the sequence of merges of the
one-pair-at-a-time algorithm; the tests compare it with a plain sequential implementation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch

#: Similarity of an absent edge (both ends in one cluster): below every threshold.
NO_EDGE = float("-inf")
_EXACT_LIMIT = 2 ** 53


def grid_edges(grid_hw: Tuple[int, int], device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The 4-neighbourhood edges of an ``h x w`` patch grid, row-major patch indices.

    Returns:
        ``(u, v)``: two ``(E,)`` int64 tensors with ``u < v``, ``E = h (w - 1) + (h - 1) w``: the horizontal
        edges ``(p, p + 1)`` first, then the vertical ones ``(p, p + w)``.
    """
    h, w = (int(s) for s in grid_hw)
    idx = torch.arange(h * w, device=device).view(h, w)
    horizontal = (idx[:, :-1].reshape(-1), idx[:, 1:].reshape(-1))
    vertical = (idx[:-1, :].reshape(-1), idx[1:, :].reshape(-1))
    return torch.cat([horizontal[0], vertical[0]]), torch.cat([horizontal[1], vertical[1]])


def exact_feature_scale(num_patches: int, dim: int) -> int:
    """The largest integer ``Q`` such that quantized features with ``|k_pc| <= Q`` keep every cluster-sum
    dot product below 2**53: ``num_patches**2 * dim * Q**2 <= 2**53`` (each of at most ``num_patches**2``
    patch pairs contributes at most ``dim * Q**2``).

    Raises:
        ValueError: the grid and feature size leave no exact integer scale (``Q < 1``).
    """
    q = math.isqrt(_EXACT_LIMIT // (max(int(num_patches), 1) ** 2 * max(int(dim), 1)))
    if q < 1:
        raise ValueError(f"{num_patches} patches of dimension {dim} are too many for exact float64 sums")
    return q


def quantize_features(features: torch.Tensor) -> torch.Tensor:
    """Integer-valued float64 features for exact merging.

    Args:
        features: ``(B, N, C)`` float features of ``B`` crops (any dtype, any device).

    Returns:
        ``(B, N, C)`` float64 with integer values, each crop scaled so that its largest absolute component
        is :func:`exact_feature_scale` ``(N, C)`` and rounded half to even. An all-zero crop stays zero.
        Cosine similarities of the result differ from the float features' by about ``1 / Q`` (``Q`` is about
        3,300 for 32x32 patches of dimension 768: finer than the fp16 features of the published code).
    """
    if features.dim() != 3:
        raise ValueError(f"features must be (B, N, C), got {tuple(features.shape)}")
    _, n, c = features.shape
    scale = exact_feature_scale(n, c)
    x = features.to(torch.float64)
    peak = x.abs().amax(dim=(1, 2), keepdim=True)
    factor = torch.where(peak > 0, scale / peak.clamp_min(1e-300), torch.zeros_like(peak))
    return torch.round(x * factor)


def cosine_from_exact(dot: torch.Tensor, norm_a: torch.Tensor, norm_b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity from exact integer-valued float64 ``dot = <a, b>``, ``norm_a = |a|^2``,
    ``norm_b = |b|^2``: ``dot / sqrt(norm_a * norm_b)``, 0 where a vector is zero (the published code
    normalises with an epsilon, which gives 0 there too)."""
    prod = norm_a * norm_b
    return torch.where(prod > 0, dot / torch.sqrt(prod), torch.zeros_like(dot))


@dataclass
class MergeHierarchy:
    """The partitions of every crop after every threshold.

    Attributes:
        labels: ``(B, L, N)`` int64: after level ``t`` (thresholds in the given order), the cluster id of each
            patch, i.e. the smallest row-major patch index of its cluster.
        thresholds: the ``L`` thresholds, finest (largest) first.
        grid_hw: the patch grid.
        merges: ``(B,)`` int64 merges performed per crop.
        rounds: lock-step rounds the batch took (the largest per-crop merge count plus level changes).
    """

    labels: torch.Tensor
    thresholds: Tuple[float, ...]
    grid_hw: Tuple[int, int]
    merges: torch.Tensor
    rounds: int


def check_thresholds(thresholds: Sequence[float]) -> Tuple[float, ...]:
    """The thresholds as a tuple, checked to be strictly decreasing (finest level first)."""
    th = tuple(float(t) for t in thresholds)
    if not th:
        raise ValueError("at least one merging threshold is needed")
    if any(b >= a for a, b in zip(th, th[1:])):
        raise ValueError(f"merging thresholds must be strictly decreasing (finest first), got {list(th)}")
    return th


@torch.no_grad()
def iterative_merge(features: torch.Tensor, grid_hw: Tuple[int, int], thresholds: Sequence[float],
                    quantized: bool = False, check_every: int = 8) -> MergeHierarchy:
    """Bottom-up merging of adjacent clusters for a batch of crops (see the module docstring).

    Args:
        features: ``(B, N, C)`` patch features of ``B`` crops, ``N = h * w`` row-major; on any device.
        grid_hw: ``(h, w)``.
        thresholds: cosine-similarity thresholds, strictly decreasing (the published ones: 0.6, 0.5, ..., 0.1).
        quantized: ``features`` are already integer-valued float64 within the bound of
            :func:`exact_feature_scale` (e.g. from :func:`quantize_features`); otherwise they are quantized here.
        check_every: rounds between the (device-synchronising) checks whether every crop has finished.

    Returns:
        :class:`MergeHierarchy` on the device of ``features``.

    Memory: the Gram matrix of cluster sums, ``B * N * N`` float64 (8 MB per 32x32 crop); split large batches.
    """
    th = check_thresholds(thresholds)
    if features.dim() != 3:
        raise ValueError(f"features must be (B, N, C), got {tuple(features.shape)}")
    h, w = (int(s) for s in grid_hw)
    b, n, _ = features.shape
    if n != h * w:
        raise ValueError(f"features hold {n} patches, the grid {h}x{w} has {h * w}")
    device = features.device
    q = features if quantized else quantize_features(features)
    if q.dtype != torch.float64:
        raise ValueError("quantized features must be float64")
    num_levels = len(th)
    labels = torch.arange(n, device=device).repeat(b, 1)
    out = labels[:, None, :].repeat(1, num_levels, 1)
    merges = torch.zeros(b, dtype=torch.int64, device=device)
    if b == 0:
        return MergeHierarchy(out, th, (h, w), merges, 0)
    eu, ev = grid_edges((h, w), device)
    if eu.numel() == 0:  # a 1x1 grid: nothing to merge
        return MergeHierarchy(out, th, (h, w), merges, 0)
    # rows[crop * N + x, p] = <S_x, k_p>: the dot product of cluster x's feature sum with every patch feature
    # (for a cluster id x; rows of ids that are no longer cluster ids are stale and never read). A merge adds
    # row c to row a; a segment sum of row a over the label map then gives <S_a, S_y> for every cluster y.
    # Every entry is an integer below 2**53, so float64 holds it exactly.
    rows = torch.bmm(q, q.transpose(1, 2)).view(b * n, n)
    crop = torch.arange(b, device=device)
    norms = rows.view(b, n, n).diagonal(dim1=1, dim2=2).clone()  # |S_x|^2 per cluster id
    edge_dot = rows.view(b, n, n)[:, eu, ev]  # <S_x, S_y> of the two clusters of every grid edge
    eu, ev = eu.expand(b, -1), ev.expand(b, -1)
    cu, cv = labels.gather(1, eu), labels.gather(1, ev)
    th_t = torch.tensor(th, dtype=torch.float64, device=device)
    level = torch.zeros(b, dtype=torch.int64, device=device)
    level_ids = torch.arange(num_levels, device=device)
    no_edge = torch.full_like(edge_dot, NO_EDGE)
    big = torch.full_like(cu, n * n)  # above every pair code
    rounds = 0
    while True:
        lo, hi = torch.minimum(cu, cv), torch.maximum(cu, cv)
        sim = torch.where(cu != cv, cosine_from_exact(edge_dot, norms.gather(1, lo), norms.gather(1, hi)), no_edge)
        best = sim.amax(dim=1)
        # the total order: highest similarity, then the smallest (smaller id, larger id)
        code = torch.where(sim == best[:, None], lo * n + hi, big).amin(dim=1)
        # Levels whose threshold the best pair does not reach are finished: record the partition.
        passed = (th_t[None, :] > best[:, None]).sum(dim=1)
        new_level = torch.maximum(level, passed)
        record = (level_ids[None, :] >= level[:, None]) & (level_ids[None, :] < new_level[:, None])
        out = torch.where(record[:, :, None], labels[:, None, :], out)
        level = new_level
        do = level < num_levels
        # A crop that does not merge gets a = c = 0 (patch 0 always labels cluster 0): with a zero weight on the
        # row update, every update below rewrites cluster 0's exact values with themselves.
        a = torch.where(do, code // n, torch.zeros_like(code))
        c = torch.where(do, code % n, torch.zeros_like(code))
        rows.index_add_(0, crop * n + a, rows.index_select(0, crop * n + c) * do.to(torch.float64)[:, None])
        labels = torch.where(labels == c[:, None], a[:, None], labels)
        dots_a = torch.zeros_like(norms).scatter_add_(1, labels, rows.index_select(0, crop * n + a))
        norms.scatter_(1, a[:, None], dots_a.gather(1, a[:, None]))
        cu, cv = labels.gather(1, eu), labels.gather(1, ev)
        touches_a = (cu == a[:, None]) | (cv == a[:, None])
        edge_dot = torch.where(touches_a, dots_a.gather(1, torch.where(cu == a[:, None], cv, cu)), edge_dot)
        merges += do.to(torch.int64)
        rounds += 1
        if rounds % check_every == 0 and not bool(do.any()):
            break
    return MergeHierarchy(out, th, (h, w), merges, rounds)
