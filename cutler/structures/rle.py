"""COCO mask encodings: polygons, uncompressed and compressed run-length encodings (RLE), via pycocotools.

Conventions: a *compressed RLE* is ``{"size": [H, W], "counts": bytes}`` as pycocotools computes with it;
its *JSON form* has ``counts`` as an ASCII ``str`` (what COCO files hold). Every function accepts both.
Masks that are only ever needed encoded (self-training labels, evaluation) stay encoded: area, box and
IoU are computed on the RLE.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np
from pycocotools import mask as mask_util


def encode_masks(masks: np.ndarray) -> List[Dict[str, Any]]:
    """``(N, H, W)`` bool masks -> N compressed RLEs in JSON form (``counts`` as str)."""
    if len(masks) == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(np.asarray(masks, dtype=np.uint8).transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> Dict[str, Any]:
    """Any COCO segmentation -> one compressed RLE with bytes ``counts``.

    Polygons (a list of ``[x0, y0, x1, y1, ...]``, merged into one mask of ``height x width``),
    uncompressed RLE (``counts`` a list of run lengths) and compressed RLE (``counts`` str or bytes) are
    accepted; the image size is that of the RLE itself when it carries one.

    Raises:
        ValueError: anything else (the message names the type).
    """
    if isinstance(segmentation, list):
        return mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict):
        counts = segmentation.get("counts")
        if isinstance(counts, list):
            return mask_util.frPyObjects(segmentation, *segmentation["size"])
        if isinstance(counts, (str, bytes)):
            return {"size": list(segmentation["size"]),
                    "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    raise ValueError(f"unsupported COCO segmentation of type {type(segmentation).__name__}: expected polygons "
                     "(a list), or an RLE dict with 'size' and 'counts'")


def rle_to_json(rle: Dict[str, Any]) -> Dict[str, Any]:
    """A compressed RLE in JSON form: ``{"size": [H, W], "counts": str}``."""
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def rle_area(rle: Dict[str, Any]) -> float:
    """Foreground pixels of a compressed RLE."""
    return float(mask_util.area(rle))


def rle_to_bbox(rle: Dict[str, Any]) -> List[float]:
    """The XYWH box (pixels) enclosing a compressed RLE; ``[0, 0, 0, 0]`` for an empty mask."""
    return [float(v) for v in mask_util.toBbox(rle)]


def rle_iou(rles1: Sequence[Dict[str, Any]], rles2: Sequence[Dict[str, Any]]) -> np.ndarray:
    """``(N, M)`` float64 IoU of two lists of compressed RLEs of one image (plain IoU: no crowd regions)."""
    if not rles1 or not rles2:
        return np.zeros((len(rles1), len(rles2)), dtype=np.float64)
    ious = mask_util.iou(list(rles1), list(rles2), [0] * len(rles2))
    return np.asarray(ious, dtype=np.float64).reshape(len(rles1), len(rles2))
