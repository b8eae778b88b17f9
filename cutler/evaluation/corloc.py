"""CorLoc: single-object discovery (VOC07/VOC12 trainval, COCO20K).

An image is correctly localised when its top-scoring predicted box has IoU > 0.5 with at least one
ground-truth box. CorLoc is the percentage of correctly localised images among the images that have at
least one (non-crowd) ground-truth box. Images with such a box but no prediction count as failures;
predictions on images without ground-truth boxes are ignored. Boxes are continuous XYWH pixels.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence, Union

import numpy as np
from pycocotools.coco import COCO

from .coco_eval import JsonLike, check_result_image_ids, load_class_agnostic_gt, load_results


def box_iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``[N, M]`` of XYWH boxes ``a [N, 4]`` and ``b [M, 4]`` (continuous coordinates)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ax1, ay1 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx1, by1 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax1[:, None], bx1[None]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(ay1[:, None], by1[None]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def corloc(gt: Union[JsonLike, COCO], results: Union[JsonLike, Sequence[Mapping[str, Any]]],
           iou_thresh: float = 0.5) -> Dict[str, float]:
    """CorLoc of ``results`` (COCO detections, ``bbox`` XYWH + ``score``) against ``gt``.

    Returns:
        ``{"corloc": % of images, "num_images": images with a GT box, "num_correct": ...,
        "num_without_prediction": ...}``.

    Raises:
        EvaluationInputError: predictions for image ids the ground truth lacks.
    """
    gt_coco = load_class_agnostic_gt(gt)
    results = load_results(results)
    check_result_image_ids(results, gt_coco)
    top: Dict[Any, Mapping[str, Any]] = {}
    for r in results:  # first of equal scores wins, as a stable sort would keep it
        if r["image_id"] not in top or float(r["score"]) > float(top[r["image_id"]]["score"]):
            top[r["image_id"]] = r
    n_images = n_correct = n_missing = 0
    for image_id in gt_coco.getImgIds():
        boxes = [a["bbox"] for a in gt_coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        if not boxes:
            continue
        n_images += 1
        if image_id not in top:
            n_missing += 1
            continue
        if (box_iou_xywh(np.asarray([top[image_id]["bbox"]]), np.asarray(boxes)) > iou_thresh).any():
            n_correct += 1
    return {"corloc": 100.0 * n_correct / n_images if n_images else float("nan"), "num_images": n_images,
            "num_correct": n_correct, "num_without_prediction": n_missing}
