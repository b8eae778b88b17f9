"""Per-image MaskCut post-processing: dense CRF, hole filling, CRF-IoU rejection, resize, COCO RLE.

:func:`postprocess_image` is a plain picklable function of numpy arrays so that it can run in a
process pool beside the GPU/ViT work (pydensecrf holds the GIL and is single-threaded).
"""
from __future__ import annotations

import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..structures.masks import mask_iou
from ..structures.rle import encode_masks, rle_area, rle_to_bbox
from .crf import CRFParams, pydensecrf_refine


def _dense_iou(m1: np.ndarray, m2: np.ndarray) -> float:
    """IoU of two ``(H, W)`` bool arrays (0 when both are empty)."""
    return float(mask_iou(torch.from_numpy(np.ascontiguousarray(m1)).flatten(),
                          torch.from_numpy(np.ascontiguousarray(m2)).flatten()))


def resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """``(h, w)`` bool mask -> ``(height, width)`` bool, as the reference does it.

    The mask is drawn as a 0/255 8-bit image, resized with PIL's default (bicubic) filter and
    re-binarized at half its maximum.
    """
    from PIL import Image

    if mask.shape == (height, width):
        return mask.astype(bool)
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((int(width), int(height)), Image.BICUBIC)
    arr = np.asarray(img)
    top = int(arr.max())
    return arr > top / 2.0 if top > 0 else np.zeros((height, width), dtype=bool)


def encode_mask(mask: np.ndarray) -> Optional[dict]:
    """COCO annotation fields of an ``(H, W)`` bool mask: RLE (str counts), area, bbox XYWH; None if empty."""
    rle = encode_masks(mask[None])[0]
    area = rle_area(rle)
    if area < 1:
        return None
    return {"segmentation": rle, "area": area, "bbox": rle_to_bbox(rle), "iscrowd": 0, "category_id": 1}


def _nearest_resize(mask: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    if mask.shape == tuple(hw):
        return mask
    ys = (np.arange(hw[0]) * mask.shape[0] // hw[0]).clip(0, mask.shape[0] - 1)
    xs = (np.arange(hw[1]) * mask.shape[1] // hw[1]).clip(0, mask.shape[1] - 1)
    return mask[ys][:, xs]


def postprocess_image(image: np.ndarray, masks: np.ndarray, width: int, height: int, crf: str = "pydensecrf",
                      crf_outputs: Optional[Sequence[np.ndarray]] = None, crf_iou_thresh: float = 0.5,
                      params: CRFParams = CRFParams()) -> Tuple[List[dict], dict]:
    """Turn one image's upsampled stage masks into COCO annotation dicts.

    Args:
        image: ``(H, W, 3)`` uint8 RGB at the MaskCut resolution (``fixed_size``).
        masks: ``(K, h, w)`` bool disjoint stage masks at the resized-image resolution (empty ones allowed).
        width, height: original image size in pixels (after EXIF orientation).
        crf: ``"pydensecrf"`` (run here), ``"precomputed"`` (``crf_outputs`` given, e.g. by the torch CRF)
            or ``"none"`` (the mask itself; no hole filling, no rejection).
        crf_outputs: K ``(H, W)`` bool CRF label maps when ``crf == "precomputed"``.
        crf_iou_thresh: masks whose filled CRF output has IoU < this with the input are discarded.

    Returns:
        (annotations without ids, timings ``{"crf": s, "encode": s}``). Annotations keep stage order;
        each has ``segmentation`` (RLE, str counts), ``area``, ``bbox`` (XYWH), ``iscrowd``, ``category_id``.
    """
    from scipy import ndimage

    t_crf = t_enc = 0.0
    out = []
    hw = image.shape[:2]
    for k, mask in enumerate(masks):
        if not mask.any():
            continue  # an empty input mask can only be rejected (IoU 0) or give an empty output
        t0 = time.perf_counter()
        if crf == "none":
            refined = mask.astype(bool)
            keep = True
        else:
            raw = crf_outputs[k] if crf == "precomputed" else pydensecrf_refine(image, mask.astype(np.float32), params)
            refined = ndimage.binary_fill_holes(np.asarray(raw) >= 0.5)
            keep = _dense_iou(_nearest_resize(mask.astype(bool), hw), refined) >= crf_iou_thresh
        t1 = time.perf_counter()
        t_crf += t1 - t0
        if keep:
            ann = encode_mask(resize_mask(refined, width, height))
            if ann is not None:
                ann["stage"] = k
                out.append(ann)
        t_enc += time.perf_counter() - t1
    return out, {"crf": t_crf, "encode": t_enc}
