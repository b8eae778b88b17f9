"""STEGO (Hamilton et al., ICLR 2022): "stuff" labels distilled from frozen DINO patch features.

* Features: the DINO ViT's patch tokens after the last block and the final LayerNorm, ``(B, C, h, w)``.
* Head (:class:`StegoHead`): a 1x1 linear projection plus a two-layer non-linear 1x1 projection
  (conv, ReLU, conv), summed, giving a ``dim``-channel code; Dropout2d on the input features in training.
* Loss (:func:`correspondence_loss`), for a pair of images with features ``f1, f2`` and codes ``c1, c2``
  sampled at ``n x n`` random points: ``F_hwij = <f1_hw, f2_ij>`` and ``S_hwij = <c1_hw, c2_ij>`` on
  L2-normalised vectors, ``F`` optionally centred per point ``hw`` (its mean over ``ij`` removed, the global
  mean kept), and ``L = - mean_hwij (F_hwij - b) max(S_hwij, 0)``. The mean over the ``n^4`` terms is the
  sum of the formula scaled by a constant. Three pair types, each with its own shift ``b`` and weight: the
  image with itself, with one of its K nearest neighbours (by global DINO feature), and with random other
  images of the batch (:func:`stego_pair_losses`).
* Cluster probe (:func:`fit_cluster_probe`): spherical k-means (faiss) on the normalised codes of sampled
  pixels; a pixel's probabilities are ``softmax(alpha * cos(code, centroid))`` (STEGO's ``alpha = 2`` at
  inference). STEGO fits the same objective online with a gradient step per batch; here Lloyd iterations
  solve it after the head is trained.
* CRF (:func:`crf_refine`): the fully connected CRF with STEGO's parameters (10 iterations, Gaussian sxy 1 /
  weight 3, bilateral sxy 67 / srgb 3 / weight 4) on the cluster probabilities, batched in torch on any device
  or with pydensecrf per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cutler.maskcut.crf import CRFParams

STEGO_CRF = CRFParams(num_iters=10, gaussian_sxy=1.0, gaussian_compat=3.0, bilateral_sxy=67.0, bilateral_srgb=3.0,
                      bilateral_compat=4.0)


class StegoHead(nn.Module):
    """``(B, C, h, w)`` frozen features -> ``(B, dim, h, w)`` code: linear 1x1 + (1x1, ReLU, 1x1), summed.

    Args:
        in_dim: feature channels C (384 for ViT-S, 768 for ViT-B).
        dim: code channels (STEGO: 70 for ViT-S, 90 for ViT-B).
        dropout: Dropout2d probability on the input features (training only).
    """

    def __init__(self, in_dim: int, dim: int = 70, dropout: float = 0.1):
        super().__init__()
        self.linear = nn.Conv2d(in_dim, dim, 1)
        self.nonlinear = nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.ReLU(), nn.Conv2d(in_dim, dim, 1))
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, feats: Tensor) -> Tensor:
        x = self.dropout(feats)
        return self.linear(x) + self.nonlinear(x)


@torch.no_grad()
def dino_patch_tokens(extractor, images: Tensor) -> Tensor:
    """``(B, C, H/p, W/p)`` float32 patch tokens after the last block and the final LayerNorm.

    Args:
        extractor: a :class:`cutler.maskcut.vit.DinoFeatureExtractor` (its ViT and normalisation).
        images: ``(B, 3, H, W)`` uint8 RGB; H, W multiples of the patch size.
    """
    from cutler.maskcut.vit import _autocast_context

    b, _, h, w = images.shape
    p = extractor.patch_size
    vit = extractor.vit
    with _autocast_context(images.device, extractor.amp_dtype):
        tokens = extractor.embed_tokens(images)
        for blk in vit.blocks:
            tokens = blk(tokens)
        tokens = vit.norm(tokens)
    return tokens[:, 1:].float().transpose(1, 2).reshape(b, -1, h // p, w // p)


def global_features(tokens: Tensor) -> Tensor:
    """``(B, C)`` L2-normalised mean patch token: the image feature nearest neighbours are found with."""
    return F.normalize(tokens.mean(dim=(2, 3)), dim=1)


# ------------------------------------------------------------------------------------------- loss
def _unit(t: Tensor) -> Tensor:
    return F.normalize(t, dim=1, eps=1e-10)


def correlation(a: Tensor, b: Tensor) -> Tensor:
    """``(B, h, w, i, j)`` dot products of every position of ``a (B, C, h, w)`` with every one of ``b (B, C, i, j)``."""
    return torch.einsum("nchw,ncij->nhwij", a, b)


def correspondence_loss(f1: Tensor, f2: Tensor, c1: Tensor, c2: Tensor, shift: float, pointwise: bool = True,
                        zero_clamp: bool = True) -> Tuple[Tensor, Tensor]:
    """STEGO's loss for one pair type (see the module docstring).

    Args:
        f1, f2: ``(B, C, h, w)`` / ``(B, C, i, j)`` frozen features of the two images (no gradient needed).
        c1, c2: ``(B, D, h, w)`` / ``(B, D, i, j)`` head codes at the same points.
        shift: b.
        pointwise: centre the feature correlation per point of the first image.
        zero_clamp: ``max(S, 0)`` (False: S unclamped).

    Returns:
        ``(loss scalar, S (B, h, w, i, j))``.
    """
    with torch.no_grad():
        fd = correlation(_unit(f1), _unit(f2))
        if pointwise:
            fd = fd - fd.mean(dim=(3, 4), keepdim=True) + fd.mean()
    cd = correlation(_unit(c1), _unit(c2))
    s = cd.clamp(min=0.0) if zero_clamp else cd
    return -(s * (fd - shift)).mean(), cd


@dataclass(frozen=True)
class PairWeights:
    """Shift and weight of each pair type, and the point sampling (values: the ``stego`` config section, whose
    defaults are STEGO's COCO-Stuff configuration)."""

    self_shift: float
    knn_shift: float
    random_shift: float
    self_weight: float
    knn_weight: float
    random_weight: float
    feature_samples: int  # n: the loss sees n x n random points per image
    neg_samples: int  # random-image pairs per image and step
    pointwise: bool
    zero_clamp: bool

    @classmethod
    def from_config(cls, c) -> "PairWeights":
        return cls(float(c.self_shift), float(c.knn_shift), float(c.random_shift), float(c.self_weight),
                   float(c.knn_weight), float(c.random_weight), int(c.feature_samples), int(c.neg_samples),
                   bool(c.pointwise), bool(c.zero_clamp))


def sample_points(t: Tensor, coords: Tensor) -> Tensor:
    """Bilinear samples ``(B, C, n, n)`` of ``t (B, C, h, w)`` at ``coords (B, n, n, 2)`` in [-1, 1] (x, y)."""
    return F.grid_sample(t, coords, mode="bilinear", padding_mode="border", align_corners=True)


def random_partners(batch: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """``(B,)`` index of another image of the batch for every image, uniform over the others."""
    if batch < 2:
        raise ValueError("random-image pairs need a batch of at least 2 images")
    offset = torch.randint(1, batch, (batch,), generator=generator).to(device)
    return (torch.arange(batch, device=device) + offset) % batch


def stego_pair_losses(feats: Tensor, feats_knn: Tensor, code: Tensor, code_knn: Tensor, weights: PairWeights,
                      generator: torch.Generator) -> Dict[str, Tensor]:
    """The three pair losses of a batch and their weighted sum.

    Args:
        feats, code: ``(B, C, h, w)`` / ``(B, D, h, w)`` of the batch's images.
        feats_knn, code_knn: the same for each image's nearest-neighbour partner.
        weights: shifts, weights, sampling.
        generator: CPU generator of every random draw (points, random partners).

    Returns:
        ``{"loss_self", "loss_knn", "loss_random", "loss"}`` (``loss`` = the weighted sum).
    """
    b, n = feats.shape[0], weights.feature_samples
    shape = (b, n, n, 2)
    coords1 = (torch.rand(shape, generator=generator) * 2 - 1).to(feats.device)
    coords2 = (torch.rand(shape, generator=generator) * 2 - 1).to(feats.device)
    f, c = sample_points(feats, coords1), sample_points(code, coords1)
    kw = dict(pointwise=weights.pointwise, zero_clamp=weights.zero_clamp)
    loss_self, _ = correspondence_loss(f, f, c, c, weights.self_shift, **kw)
    loss_knn, _ = correspondence_loss(f, sample_points(feats_knn, coords2), c, sample_points(code_knn, coords2),
                                      weights.knn_shift, **kw)
    negs = []
    for _ in range(weights.neg_samples):
        j = random_partners(b, generator, feats.device)
        loss, _ = correspondence_loss(f, sample_points(feats[j], coords2), c, sample_points(code[j], coords2),
                                      weights.random_shift, **kw)
        negs.append(loss)
    loss_random = torch.stack(negs).mean() if negs else feats.new_zeros(())
    total = weights.self_weight * loss_self + weights.knn_weight * loss_knn + weights.random_weight * loss_random
    return {"loss_self": loss_self, "loss_knn": loss_knn, "loss_random": loss_random, "loss": total}


# ----------------------------------------------------------------------------------- cluster probe
def fit_cluster_probe(codes: np.ndarray, num_clusters: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """``(K, D)`` unit centroids of spherical k-means (faiss) on ``(N, D)`` codes (normalised here)."""
    import faiss

    x = np.ascontiguousarray(codes, dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-10)
    if len(x) < num_clusters:
        raise ValueError(f"the cluster probe needs at least {num_clusters} pixels, got {len(x)}")
    km = faiss.Kmeans(x.shape[1], num_clusters, niter=iters, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=max(256, len(x) // num_clusters + 1))
    km.train(x)
    c = km.centroids.astype(np.float32)
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-10)


def cluster_log_probs(code: Tensor, centroids: Tensor, alpha: float = 2.0) -> Tensor:
    """``(B, K, h, w)`` log-softmax of ``alpha * cos(code, centroid)`` for ``code (B, D, h, w)``, ``centroids (K, D)``."""
    sims = torch.einsum("bdhw,kd->bkhw", _unit(code), F.normalize(centroids, dim=1))
    return torch.log_softmax(alpha * sims, dim=1)


# --------------------------------------------------------------------------------------------- CRF
def crf_refine(images: Tensor, log_probs: Tensor, params: CRFParams = STEGO_CRF, mode: str = "torch") -> Tensor:
    """Labels ``(B, H, W)`` int64 of the dense CRF on per-pixel class probabilities.

    Args:
        images: ``(B, H, W, 3)`` uint8 RGB.
        log_probs: ``(B, K, H, W)`` log-probabilities at the image size.
        params: CRF parameters (default: STEGO's).
        mode: ``"torch"`` (batched, on the tensors' device), ``"pydensecrf"`` (per image, CPU) or ``"none"``
            (argmax of the probabilities).
    """
    if mode == "none":
        return log_probs.argmax(dim=1)
    unary = -torch.log(log_probs.float().exp().clamp(1e-5, 1.0))  # pydensecrf's unary_from_softmax
    if mode == "torch":
        from cutler.maskcut.torch_crf import dense_crf_inference

        q = dense_crf_inference(unary, images.to(unary.device), params)
        return q.argmax(dim=1)
    if mode == "pydensecrf":
        from cutler.maskcut.crf import pydensecrf_marginals

        out = [pydensecrf_marginals(img.cpu().numpy(), u.cpu().numpy(), params).argmax(axis=0)
               for img, u in zip(images, unary)]
        return torch.from_numpy(np.stack(out)).to(log_probs.device).long()
    raise ValueError(f"unknown CRF mode {mode!r}; expected torch | pydensecrf | none")


__all__ = ["PairWeights", "STEGO_CRF", "StegoHead", "cluster_log_probs", "correlation", "correspondence_loss",
           "crf_refine", "dino_patch_tokens", "fit_cluster_probe", "global_features", "random_partners",
           "sample_points", "stego_pair_losses"]
