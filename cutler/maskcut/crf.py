"""Dense-CRF refinement of MaskCut masks with pydensecrf (the reference, CPU).

The model (the published MaskCut post-processing): 2 labels, unary = -log softmax([1 - m, m]) where ``m`` is the
binary mask upsampled bilinearly to the image; Gaussian pairwise (sxy 3, compat 7); bilateral pairwise
(sxy 50, srgb 5, compat 10); 10 mean-field iterations; result = argmax label map.
The torch implementation for GPUs lives in :mod:`cutler.maskcut.torch_crf` and is checked against this.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CRFParams:
    """Dense-CRF hyper-parameters as MaskCut configures them."""

    num_iters: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 7.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0


def mask_to_softmax_probs(mask: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """``(2, H, W)`` float32 softmax([1 - m, m]) of a mask bilinearly resized to ``out_hw``.

    Args:
        mask: ``(h, w)`` binary or soft mask in [0, 1].
        out_hw: image ``(H, W)``.
    """
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float64))[None]
    logits = torch.cat([1.0 - m, m], dim=0)[None]
    if tuple(logits.shape[-2:]) != tuple(out_hw):
        logits = F.interpolate(logits, size=tuple(out_hw), mode="bilinear", align_corners=False)
    return torch.softmax(logits[0], dim=0).numpy().astype(np.float32)


def pydensecrf_marginals(image: np.ndarray, unary: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Mean-field marginals of pydensecrf's ``DenseCRF2D`` with any number of labels.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        unary: ``(L, H, W)`` float unary energies (``-log p``).
        params: CRF hyper-parameters.

    Returns:
        ``(L, H, W)`` float32 marginals Q.
    """
    import pydensecrf.densecrf as dcrf

    labels, h, w = unary.shape
    crf = dcrf.DenseCRF2D(w, h, labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary.reshape(labels, -1), dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                             rgbim=np.ascontiguousarray(image, dtype=np.uint8), compat=params.bilateral_compat)
    return np.asarray(crf.inference(params.num_iters), dtype=np.float32).reshape(labels, h, w)


def pydensecrf_refine(image: np.ndarray, mask: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Refine one mask with pydensecrf's ``DenseCRF2D``.

    Args:
        image: ``(H, W, 3)`` uint8 RGB (the 480x480 resized image in MaskCut).
        mask: ``(h, w)`` mask in [0, 1]; resized bilinearly to ``(H, W)`` if needed.
        params: CRF hyper-parameters.

    Returns:
        ``(H, W)`` bool foreground label map.
    """
    from pydensecrf.utils import unary_from_softmax

    h, w = image.shape[:2]
    probs = mask_to_softmax_probs(mask, (h, w))
    unary = np.asarray(unary_from_softmax(probs)).reshape(2, h, w)
    return pydensecrf_marginals(image, unary, params).argmax(axis=0).astype(bool)
