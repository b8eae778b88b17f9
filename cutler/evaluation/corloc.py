"""CorLoc: single-object discovery (VOC07/VOC12 trainval, COCO20K).

An image is correctly localised when its top-scoring predicted box has IoU > 0.5 with at least one
ground-truth box. CorLoc is the percentage of correctly localised images among the images that have at
least one (non-crowd) ground-truth box. Images with such a box but no prediction count as failures;
predictions on images without ground-truth boxes are ignored. Boxes are continuous XYWH pixels.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence, Union

import torch
from pycocotools.coco import COCO

from ..structures.boxes import pairwise_iou, xywh_to_xyxy
from .coco_eval import JsonLike, check_result_image_ids, load_class_agnostic_gt, load_results


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
        top_box = xywh_to_xyxy(torch.tensor([top[image_id]["bbox"]], dtype=torch.float64))
        gt_boxes = xywh_to_xyxy(torch.tensor(boxes, dtype=torch.float64))
        if (pairwise_iou(top_box, gt_boxes) > iou_thresh).any():
            n_correct += 1
    return {"corloc": 100.0 * n_correct / n_images if n_images else float("nan"), "num_images": n_images,
            "num_correct": n_correct, "num_without_prediction": n_missing}
