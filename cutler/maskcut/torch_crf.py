"""Batched fully-connected CRF in torch, faithful to pydensecrf's ``DenseCRF2D`` (GPU and CPU).

Model (the one :func:`cutler.maskcut.crf.pydensecrf_refine` builds):

* unary ``U = -log clip(softmax([1 - m, m]), 1e-5, 1)`` with ``m`` the mask resized bilinearly;
* Gaussian kernel on positions ``(x, y) / sxy`` (sxy 3), Potts compatibility ``w = 7``;
* bilateral kernel on ``(x / sxy, y / sxy, r / srgb, g / srgb, b / srgb)`` (50, 5), Potts ``w = 10``;
* both kernels NORMALIZE_SYMMETRIC: ``Kn(v) = n * K(n * v)`` with ``n = 1 / sqrt(K(1) + 1e-20)``, where ``K`` is
  the lattice filter itself (so the normaliser carries the lattice's approximation error, as in pydensecrf) and the
  self term ``k(i, i)`` is *included* (pydensecrf never subtracts it);
* mean field: ``Q = softmax(-U)``; each iteration ``logits = -U + sum_k w_k * Kn_k(Q)``; ``Q = softmax(logits)``;
* result: label 1 where ``Q_1 > Q_0`` (ties go to label 0, like numpy's argmax).

``K`` is pydensecrf's permutohedral-lattice approximation of ``exp(-|f_i - f_j|^2 / 2)`` (Adams et al. 2010),
re-implemented here with tensor ops (scatter/gather, ``torch.unique`` as the hash table): same elevation and scale
factors, same round-half-even simplex search, same barycentric weights, blur ``v + 0.5 (v[n1] + v[n2])`` along the
d + 1 lattice directions in the same order with missing neighbours read as 0, and slicing with the same
``alpha = 1 / (1 + 2^-d)``. Only float summation order differs, so Q agrees with pydensecrf to ~1e-6.
The spatial kernel can alternatively be the exact (untruncated to float precision) separable Gaussian
(``gaussian="exact"``); see ``docs/crf.md`` for measured fidelity/speed of both.

Batching: several masks of one image share that image's lattices. Lattices of all distinct images are built in one
pass (one global vertex table whose codes carry the image index); the masks of each image are packed as value
channels, and, because ``sum_l Q_l = 1``, only ``L - 1`` label channels are filtered per mask (the last one is
``Kn(1) - sum`` of the others, with ``Kn(1)`` precomputed once per image).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cutler.maskcut.crf import CRFParams

__all__ = [
    "CRFParams",
    "PermutohedralLattice",
    "SeparableGaussian",
    "CRFKernels",
    "build_crf_kernels",
    "masks_to_unary",
    "dense_crf_inference",
    "torch_crf_refine",
    "consecutive_image_index",
]


# --------------------------------------------------------------------------------------------------------------
# Permutohedral lattice
# --------------------------------------------------------------------------------------------------------------
class PermutohedralLattice:
    """Permutohedral lattices of ``U`` point sets (one per image), built together.

    ``filter(v)`` computes pydensecrf's ``Permutohedral::compute``: an approximation of
    ``out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j`` (self term included, unnormalised, scaled by the lattice's
    constant factor) within each point set.

    Args:
        features: ``(U, N, d)`` float32 feature vectors (already divided by the kernel's standard deviations).
    """

    def __init__(self, features: torch.Tensor):
        if features.dim() != 3:
            raise ValueError(f"features must be (U, N, d), got {tuple(features.shape)}")
        feats = features.to(torch.float32)
        u, n, d = feats.shape
        # pydensecrf's SSE build processes points in blocks of 4 and pads the last block with all-zero feature
        # vectors; those phantom points are never splatted or sliced, but their simplex vertices are inserted into
        # the lattice and relay values during blurring. Reproduce that with one zero point per set.
        n_phantom = 1 if n % 4 else 0
        if n_phantom:
            feats = torch.cat([feats, feats.new_zeros(u, 1, d)], 1)
        n_all = n + n_phantom
        dev = feats.device
        self.num_sets, self.num_points, self.dim = u, n, d
        d1 = d + 1

        # Elevation onto the hyperplane sum(x) = 0 (scale factors computed in double then stored as float, as in C++).
        inv_std_dev = float(torch.tensor(math.sqrt(2.0 / 3.0) * d1, dtype=torch.float32))
        scale = torch.tensor([1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev for i in range(d)],
                             dtype=torch.float32, device=dev)
        elevated = torch.empty(u, n_all, d1, dtype=torch.float32, device=dev)
        sm = torch.zeros(u, n_all, dtype=torch.float32, device=dev)
        for j in range(d, 0, -1):  # loop over the (few) feature dimensions, not over points
            cf = feats[..., j - 1] * scale[j - 1]
            elevated[..., j] = sm - float(j) * cf
            sm = sm + cf
        elevated[..., 0] = sm

        # Closest remainder-0 lattice point: round-half-even of elevated / (d + 1), times (d + 1).
        down = float(torch.tensor(1.0 / d1, dtype=torch.float32))
        v = torch.round(elevated * down)
        rem0 = v * float(d1)
        vsum = v.sum(-1, keepdim=True)  # integer-valued, exact in float

        # Rank of each coordinate of (elevated - rem0) in decreasing order (ties broken like pydensecrf).
        di = elevated - rem0
        lt = di[..., :, None] < di[..., None, :]  # lt[..., i, j] = di_i < di_j
        upper = torch.ones(d1, d1, dtype=torch.bool, device=dev).triu(1)  # upper[a, b] = a < b
        rank = ((lt & upper).sum(-1) + ((~lt) & upper).sum(-2)).to(torch.float32)
        rank = rank + vsum
        add = (rank < 0).to(torch.float32) * d1
        sub = (rank >= d1).to(torch.float32) * d1
        rank = rank + (add - sub)
        rem0 = rem0 + (add - sub)
        rank_i = rank.to(torch.int64)

        # Barycentric weights: with vs[r] = (elevated_i - rem0_i) / (d + 1) for the coordinate of rank r,
        # b[p] = vs[d - p] - vs[d - p + 1] (p = 1..d), b[0] = vs[d] + (1 - vs[0]) (same single roundings as C++).
        vv = (elevated - rem0) * down
        vs = torch.empty_like(vv).scatter_(-1, rank_i, vv)
        bary = torch.empty_like(vv)
        bary[..., 1:] = vs[..., :d].flip(-1) - vs[..., 1:].flip(-1)
        bary[..., 0] = vs[..., d] + (1.0 - vs[..., 0])

        # Vertex keys (first d coordinates): key_r[i] = rem0[i] + r - (d + 1) * [rank_i > d - r], r = 0..d.
        # Keys are encoded as int64 codes (mixed radix over coordinates, image index as the most significant digit);
        # every key and every blur neighbour lies within rem0 -/+ 2(d + 1), which sets the radix.
        rem0_i = rem0[..., :d].to(torch.int64)
        lo = rem0_i.reshape(-1, d).amin(0) - 2 * d1
        hi = rem0_i.reshape(-1, d).amax(0) + 2 * d1
        radix = (hi - lo + 1).tolist()
        bits = math.log2(max(u, 1)) + sum(math.log2(r) for r in radix)
        if bits > 62:
            raise ValueError(f"lattice key range too large to encode in int64 ({bits:.1f} bits)")
        mult = [1] * d
        for i in range(d - 2, -1, -1):
            mult[i] = mult[i + 1] * radix[i + 1]
        self._lo, self._radix = lo, radix
        self._mult = torch.tensor(mult, dtype=torch.int64, device=dev)
        img_mult = mult[0] * radix[0]
        base = torch.arange(u, device=dev)[:, None] * img_mult + ((rem0_i - lo) * self._mult).sum(-1)  # (U, N)
        total_mult = int(sum(mult))
        # wrap_r = sum_i mult_i [rank_i >= d + 1 - r]: place mult_i at its rank, then a suffix sum over ranks.
        # The ranks of one point are a permutation, so a plain scatter_ (no accumulation, hence deterministic on
        # CUDA too) is exact.
        by_rank = torch.zeros(u, n_all, d1 + 1, dtype=torch.int64, device=dev)
        by_rank.scatter_(-1, rank_i[..., :d], self._mult.expand(u, n_all, d))
        suffix = by_rank.flip(-1).cumsum(-1).flip(-1)  # suffix[k] = sum over ranks >= k (suffix[d + 1] = 0)
        r_idx = torch.arange(d1, device=dev)
        codes = base[..., None] + r_idx * total_mult - d1 * suffix[..., d1 - r_idx]
        uniq, inverse = torch.unique(codes.view(-1), sorted=True, return_inverse=True)
        m = uniq.numel()
        self.num_vertices = m
        # offsets[r, p]: vertex id of point p's r-th simplex corner; vertex m is a zero "missing" slot.
        # Point-major copies for splatting (accumulation order as in pydensecrf), corner-major for slicing.
        inverse = inverse.view(u, n_all, d1)[:, :n].reshape(-1)
        self._splat_index = inverse
        self._splat_weights = bary[:, :n].reshape(u * n, d1)
        self.offsets = inverse.view(u * n, d1).t().contiguous()
        self.weights = self._splat_weights.t().contiguous()
        self.alpha = float(torch.tensor(1.0, dtype=torch.float32) / (1.0 + torch.tensor(2.0 ** (-d), dtype=torch.float32)))

        # Blur neighbours along lattice direction j: n1 = key - 1 (+ (d + 1) on coordinate j), n2 = key + 1
        # (- (d + 1) on coordinate j); in code space these are constant shifts. Only existing vertices are linked,
        # others read the zero slot (pydensecrf's hash lookup without insertion).
        # n1 along j is the inverse of n2 along j (key + 1 - (d + 1) e_j and key - 1 + (d + 1) e_j undo each other),
        # so one search per direction suffices.
        nbrs = torch.full((d1, 2, m + 1), m, dtype=torch.int64, device=dev)
        src = torch.arange(m, device=dev)
        for j in range(d1):
            shift = total_mult - (d1 * mult[j] if j < d else 0)
            c = uniq + shift
            pos = torch.searchsorted(uniq, c).clamp_(max=m - 1)
            found = uniq[pos] == c
            nbrs[j, 1, :m] = torch.where(found, pos, torch.full_like(pos, m))
            nbrs[j, 0, pos[found]] = src[found]
        nbrs = nbrs[..., :m].contiguous()
        self.neighbors = nbrs

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """Splat, blur, slice.

        Args:
            values: ``(C, U, N)`` float32, channel-major (``C`` value channels of each of the ``U * N`` points).

        Returns:
            ``(C, U, N)`` float32 filtered values.
        """
        c = values.shape[0]
        d1 = self.dim + 1
        m = self.num_vertices
        flat = values.reshape(c, -1)
        # Splat in (point, corner) order, matching pydensecrf's accumulation order on CPU. Channel-major gathers and
        # scatters are 1-D per channel, which is what CPU kernels do fastest; on GPU the layout is neutral.
        contrib = flat[:, :, None] * self._splat_weights
        buf = torch.zeros(c, m + 1, dtype=values.dtype, device=values.device)
        buf.index_add_(1, self._splat_index, contrib.reshape(c, -1))
        new = torch.empty_like(buf)
        new[:, m] = 0  # the trailing "missing neighbour" slot stays zero
        for j in range(d1):
            nb = self.neighbors[j]
            torch.add(buf[:, :m], 0.5 * (buf.index_select(1, nb[0]) + buf.index_select(1, nb[1])), out=new[:, :m])
            buf, new = new, buf
        out = (self.weights[0] * buf.index_select(1, self.offsets[0])) * self.alpha
        for r in range(1, d1):
            out = out + (self.weights[r] * buf.index_select(1, self.offsets[r])) * self.alpha
        return out.view(values.shape)


# --------------------------------------------------------------------------------------------------------------
# Exact separable Gaussian (optional spatial kernel)
# --------------------------------------------------------------------------------------------------------------
class SeparableGaussian:
    """Exact ``out_i = sum_j exp(-|p_i - p_j|^2 / (2 sxy^2)) v_j`` over pixel positions (self term included).

    Taps are kept out to where ``exp(-r^2 / (2 sxy^2)) < 1e-10`` (below float32 resolution relative to the centre
    tap); pixels outside the image contribute nothing (zero padding), exactly like the dense sum.

    Args:
        height, width: image size.
        sxy: standard deviation in pixels.
        num_sets: number of images ``U`` (all share this filter).
        device: torch device.
    """

    def __init__(self, height: int, width: int, sxy: float, num_sets: int, device: torch.device):
        self.h, self.w, self.num_sets = height, width, num_sets
        radius = int(math.ceil(sxy * math.sqrt(2.0 * math.log(1e10))))
        radius = min(radius, max(height, width) - 1)
        t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
        self.taps = torch.exp(-(t * t) / (2.0 * sxy * sxy)).to(torch.float32)
        self.radius = radius

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """``(C, U, N)`` -> ``(C, U, N)`` float32 with ``N = H * W`` (row-major pixels)."""
        x = values.reshape(-1, 1, self.h, self.w)
        k = self.taps
        # cuDNN runs float32 convolutions in TF32 by default on Ampere and later GPUs (10-bit mantissa, ~1e-3
        # relative error), whatever the caller's other settings; TF32 never applies to float64, so on CUDA the
        # two 1-D passes run in float64 (a few GFLOP per call) and the filter stays exact to float32 precision.
        work = torch.float64 if x.is_cuda else torch.float32
        x, k = x.to(work), k.to(work)
        x = F.conv2d(x, k.view(1, 1, 1, -1), padding=(0, self.radius))
        x = F.conv2d(x, k.view(1, 1, -1, 1), padding=(self.radius, 0))
        return x.to(values.dtype).view(values.shape)


# --------------------------------------------------------------------------------------------------------------
# Kernels of one batch of images
# --------------------------------------------------------------------------------------------------------------
class _NormalizedKernel:
    """``Kn(v) = norm * K(norm * v)`` with ``norm = 1 / sqrt(K(1) + 1e-20)`` (pydensecrf NORMALIZE_SYMMETRIC)."""

    def __init__(self, base, num_sets: int, num_points: int, device: torch.device):
        self.base = base
        ones = torch.ones(1, num_sets, num_points, dtype=torch.float32, device=device)
        k1 = base.filter(ones)
        # C++ does this in double and stores float.
        self.norm = (1.0 / torch.sqrt(k1.to(torch.float64) + 1e-20)).to(torch.float32)
        # Kn(1), used to recover the last label's message from the others (sum_l Q_l = 1).
        self.of_ones = self.apply(ones)

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        return self.base.filter(values * self.norm) * self.norm


@dataclass
class CRFKernels:
    """Normalised Gaussian and bilateral kernels of ``U`` images, reusable across mask batches.

    Attributes:
        num_images: ``U``.
        height, width: image size.
        gaussian, bilateral: normalised kernels (``apply((C, U, N)) -> (C, U, N)``).
        params: the CRF parameters they were built with.
    """

    num_images: int
    height: int
    width: int
    gaussian: _NormalizedKernel
    bilateral: _NormalizedKernel
    params: CRFParams


def build_crf_kernels(images: torch.Tensor, params: CRFParams = CRFParams(), gaussian: str = "lattice") -> CRFKernels:
    """Build both pairwise kernels for a batch of distinct images (lattice construction happens here).

    Args:
        images: ``(U, H, W, 3)`` uint8 RGB.
        params: CRF parameters.
        gaussian: ``"lattice"`` (pydensecrf's approximation, default) or ``"exact"`` (separable convolution).

    Returns:
        :class:`CRFKernels` on ``images.device``.
    """
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (U, H, W, 3), got {tuple(images.shape)}")
    u, h, w, _ = images.shape
    dev = images.device
    n = h * w
    ys, xs = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float32),
                            torch.arange(w, device=dev, dtype=torch.float32), indexing="ij")
    if gaussian == "lattice":
        gbase = _Broadcast(_spatial_lattice(h, w, float(params.gaussian_sxy), dev), u)
    elif gaussian == "exact":
        gbase = SeparableGaussian(h, w, float(params.gaussian_sxy), u, dev)
    else:
        raise ValueError(f"gaussian must be 'lattice' or 'exact', got {gaussian!r}")
    sxy, srgb = float(params.bilateral_sxy), float(params.bilateral_srgb)
    rgb = images.reshape(u, n, 3).to(torch.float32) / srgb
    posb = torch.stack([xs / sxy, ys / sxy], -1).reshape(1, n, 2).expand(u, n, 2)
    bbase = PermutohedralLattice(torch.cat([posb, rgb], -1))
    return CRFKernels(u, h, w, _NormalizedKernel(gbase, u, n, dev), _NormalizedKernel(bbase, u, n, dev), params)


_SPATIAL_CACHE: dict = {}


def _spatial_lattice(h: int, w: int, sxy: float, device: torch.device) -> PermutohedralLattice:
    """The Gaussian kernel's lattice depends only on (H, W, sxy): build it once per size and device."""
    key = (h, w, sxy, str(device))
    lat = _SPATIAL_CACHE.get(key)
    if lat is None:
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                                torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
        lat = PermutohedralLattice(torch.stack([xs / sxy, ys / sxy], -1).reshape(1, h * w, 2))
        if len(_SPATIAL_CACHE) >= 4:  # a handful of sizes at most in practice; bound the memory anyway
            _SPATIAL_CACHE.pop(next(iter(_SPATIAL_CACHE)))
        _SPATIAL_CACHE[key] = lat
    return lat


class _Broadcast:
    """Apply a single-set filter to ``U`` sets by folding them into channels (the spatial lattice is shared)."""

    def __init__(self, base, num_sets: int):
        self.base, self.num_sets = base, num_sets

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        c, u, n = values.shape
        return self.base.filter(values.reshape(c * u, 1, n)).view(c, u, n)


# --------------------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------------------
def consecutive_image_index(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deduplicate runs of identical consecutive images (several masks of one image).

    Args:
        images: ``(B, H, W, 3)`` uint8.

    Returns:
        ``(unique_images (U, H, W, 3), image_index (B,) int64)`` with ``images == unique_images[image_index]``.
    """
    b = images.shape[0]
    new = torch.ones(b, dtype=torch.bool, device=images.device)
    if b > 1:
        new[1:] = (images[1:] != images[:-1]).flatten(1).any(1)
    index = new.long().cumsum(0) - 1
    return images[new], index


def _pack_slots(image_index: torch.Tensor, num_images: int) -> tuple[torch.Tensor, int]:
    """Slot of each batch element among the elements sharing its image, and the max count."""
    b = image_index.numel()
    order = torch.argsort(image_index, stable=True)
    counts = torch.bincount(image_index, minlength=num_images)
    starts = counts.cumsum(0) - counts
    slot = torch.empty(b, dtype=torch.int64, device=image_index.device)
    slot[order] = torch.arange(b, device=image_index.device) - starts[image_index[order]]
    return slot, int(counts.max()) if b else 0


def dense_crf_inference(unary: torch.Tensor, images: torch.Tensor | None = None, params: CRFParams = CRFParams(),
                        image_index: torch.Tensor | None = None, kernels: CRFKernels | None = None,
                        gaussian: str = "lattice", complement: bool = True) -> torch.Tensor:
    """Mean-field inference of pydensecrf's DenseCRF2D model, batched.

    Args:
        unary: ``(B, L, H, W)`` float unary energies (``-log p``).
        images: ``(U, H, W, 3)`` uint8 RGB; ``U == B`` when ``image_index`` is None. Ignored if ``kernels`` given.
        params: CRF parameters (iterations, kernel widths, Potts weights); when ``kernels`` is given, the parameters
            it was built with are used instead.
        image_index: ``(B,)`` int64, image of each batch element (masks of one image share its lattices).
        kernels: prebuilt :func:`build_crf_kernels` output for the images (reuse across calls).
        gaussian: spatial kernel, ``"lattice"`` (as pydensecrf) or ``"exact"``; only used when building kernels.
        complement: filter only ``L - 1`` label channels and derive the last from ``sum_l Q_l = 1`` (halves the
            work for 2 labels; changes results only at float rounding level).

    Returns:
        ``(B, L, H, W)`` float32 marginals Q, on the device of ``unary``.
    """
    if unary.dim() != 4:
        raise ValueError(f"unary must be (B, L, H, W), got {tuple(unary.shape)}")
    b, L, h, w = unary.shape
    dev = unary.device
    if kernels is None:
        if images is None:
            raise ValueError("either images or kernels must be given")
        kernels = build_crf_kernels(images.to(dev), params, gaussian=gaussian)
    else:
        params = kernels.params
    if (kernels.height, kernels.width) != (h, w):
        raise ValueError(f"kernel size {(kernels.height, kernels.width)} != unary size {(h, w)}")
    u = kernels.num_images
    if image_index is None:
        if u != b:
            raise ValueError(f"{u} images for {b} unaries: pass image_index")
        image_index = torch.arange(b, device=dev)
    image_index = image_index.to(dev, torch.int64)
    if image_index.shape != (b,):
        raise ValueError(f"image_index must be ({b},), got {tuple(image_index.shape)}")
    n = h * w
    lf = L - 1 if complement and L > 1 else L  # filtered label channels per mask
    slot, kmax = _pack_slots(image_index, u)

    neg_u = -unary.to(torch.float32).reshape(b, L, n)
    q = torch.softmax(neg_u, dim=1)
    terms = [(kernels.gaussian, float(params.gaussian_compat)), (kernels.bilateral, float(params.bilateral_compat))]
    # Masks of one image become value channels of that image's lattice: (slot, label, image, pixel).
    packed = torch.zeros(kmax, lf, u, n, dtype=torch.float32, device=dev)
    for _ in range(int(params.num_iters)):
        packed[slot, :, image_index, :] = q[:, :lf]
        logits = neg_u
        for kern, wgt in terms:
            msg = kern.apply(packed.view(kmax * lf, u, n)).view(kmax, lf, u, n)[slot, :, image_index, :]
            if lf < L:
                last = kern.of_ones[0, image_index][:, None] - msg.sum(1, keepdim=True)
                msg = torch.cat([msg, last], 1)
            # pydensecrf: tmp -= PottsCompatibility(w) applied to the kernel output, i.e. tmp -= (-w) * Kn(Q).
            logits = logits - (-wgt) * msg
        q = torch.softmax(logits, dim=1)
    return q.view(b, L, h, w)


def masks_to_unary(masks: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Batched :func:`cutler.maskcut.crf.mask_to_softmax_probs` followed by pydensecrf's ``unary_from_softmax``.

    Args:
        masks: ``(B, h, w)`` masks in [0, 1].
        out_hw: image ``(H, W)``.

    Returns:
        ``(B, 2, H, W)`` float32 unary ``-log clip(softmax([1 - m, m]), 1e-5, 1)`` (m resized bilinearly,
        align_corners=False, computed in float64 like the reference).
    """
    m = masks.to(torch.float64)[:, None]
    logits = torch.cat([1.0 - m, m], dim=1)
    if tuple(logits.shape[-2:]) != tuple(out_hw):
        logits = F.interpolate(logits, size=tuple(out_hw), mode="bilinear", align_corners=False)
    probs = torch.softmax(logits, dim=1).to(torch.float32)
    return -torch.log(probs.clamp(1e-5, 1.0))


def torch_crf_refine(images: torch.Tensor, masks: torch.Tensor, params: CRFParams = CRFParams(),
                     image_index: torch.Tensor | None = None, gaussian: str = "lattice") -> torch.Tensor:
    """Refine masks with the dense CRF; the batched torch counterpart of ``pydensecrf_refine``.

    Args:
        images: ``(B, H, W, 3)`` uint8 RGB, one per mask (runs of identical consecutive images are detected and
            their lattices built once); or ``(U, H, W, 3)`` distinct images when ``image_index`` is given.
        masks: ``(B, h, w)`` float masks in [0, 1], resized bilinearly to ``(H, W)``.
        params: CRF parameters.
        image_index: optional ``(B,)`` int64 index into ``images``.
        gaussian: spatial kernel, ``"lattice"`` (pydensecrf's, default) or ``"exact"``.

    Returns:
        ``(B, H, W)`` bool foreground maps, on the device of ``images``.
    """
    dev = images.device
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if masks.dim() != 3:
        raise ValueError(f"masks must be (B, h, w), got {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        return torch.zeros(0, images.shape[1], images.shape[2], dtype=torch.bool, device=dev)
    if image_index is None:
        if images.shape[0] != masks.shape[0]:
            raise ValueError(f"{images.shape[0]} images for {masks.shape[0]} masks: pass image_index")
        images, image_index = consecutive_image_index(images)
    h, w = images.shape[1:3]
    unary = masks_to_unary(masks.to(dev), (h, w))
    kernels = build_crf_kernels(images, params, gaussian=gaussian)
    q = dense_crf_inference(unary, params=params, image_index=image_index, kernels=kernels)
    return q[:, 1] > q[:, 0]
