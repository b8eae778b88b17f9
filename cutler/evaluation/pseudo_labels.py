"""Evaluating pseudo-labels (MaskCut or a self-training round) directly against ground truth.

A pseudo-label file is a COCO *annotation* JSON (images + annotations, no scores). Each annotation
becomes a detection result; its score is chosen by ``score_mode``:

* ``"constant"`` (default): every annotation gets ``constant`` (1.0). The masks are then unranked:
  pycocotools sorts detections by score with a stable sort, so ties keep the order of the image ids
  and, within an image, of the annotations. AP of unranked labels therefore depends on that order
  (MaskCut writes its masks in NCut-stage order, the most salient object first). AR is unaffected.
* ``"area"``: score = mask (else box) area / image area, so larger pseudo-masks rank first, inside
  and across images; deterministic and independent of file order.
* ``"field"``: the annotation's own ``score`` field (self-training labels carry the detector score).

Images are matched to the ground truth by ``file_name`` (exact relative path, else base name) when
both files name their images, so pseudo-labels made with another id numbering still evaluate; with
``match="id"`` ids are used as they are.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import cv2
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from ..structures.rle import encode_masks, rle_area, rle_to_bbox, rle_to_json, segmentation_to_rle
from ..utils.logging import get_logger
from .coco_eval import (
    AGNOSTIC_CATEGORY_ID,
    EvaluationInputError,
    JsonLike,
    evaluate_coco,
    gt_has_masks,
    load_class_agnostic_gt,
    load_json,
)
from .corloc import corloc

logger = get_logger(__name__)
SCORE_MODES = ("constant", "area", "field")


def match_images(pred_images: Sequence[Mapping[str, Any]], gt_images: Sequence[Mapping[str, Any]],
                 match: str = "auto") -> Dict[Any, Any]:
    """``{pred image id: gt image id}`` for every predicted image found in the ground truth.

    ``match``: ``"id"``, ``"file_name"`` (exact relative path first, then unique base name) or ``"auto"``
    (file names when every image on both sides has one, else ids).
    """
    if match not in ("auto", "id", "file_name"):
        raise ValueError(f"match must be auto|id|file_name, got {match!r}")
    if match == "auto":
        named = all(im.get("file_name") for im in pred_images) and all(im.get("file_name") for im in gt_images)
        match = "file_name" if named else "id"
    if match == "id":
        gt_ids = {im["id"] for im in gt_images}
        return {im["id"]: im["id"] for im in pred_images if im["id"] in gt_ids}
    by_path = {os.path.normpath(im["file_name"]): im["id"] for im in gt_images}
    by_base: Dict[str, List[Any]] = {}
    for im in gt_images:
        by_base.setdefault(os.path.basename(im["file_name"]), []).append(im["id"])
    out = {}
    for im in pred_images:
        path = os.path.normpath(im["file_name"])
        if path in by_path:
            out[im["id"]] = by_path[path]
        elif len(by_base.get(os.path.basename(path), [])) == 1:
            out[im["id"]] = by_base[os.path.basename(path)][0]
    return out


def annotations_to_results(
    pred: JsonLike,
    gt: Union[JsonLike, COCO],
    score_mode: str = "constant",
    constant: float = 1.0,
    match: str = "auto",
    allow_unmatched: bool = False,
) -> Tuple[List[Dict[str, Any]], Dict[str, int]]:
    """Pseudo-label annotations -> COCO detection results on the ground truth's image ids.

    Masks whose size differs from the ground-truth image are resized (nearest neighbour) and their box
    rescaled; polygon masks are rasterised.

    Returns:
        ``(results, info)``; ``info`` counts ``pred_images``, ``matched_images``, ``unmatched_images``,
        ``gt_images_without_labels``, ``annotations`` and ``resized_masks``.

    Raises:
        EvaluationInputError: predicted images missing from the ground truth (unless ``allow_unmatched``),
            an unknown ``score_mode``, or ``"field"`` on annotations without ``score``.
    """
    if score_mode not in SCORE_MODES:
        raise EvaluationInputError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
    pred = load_json(pred)
    gt_data = gt.dataset if isinstance(gt, COCO) else load_json(gt)
    gt_images = {im["id"]: im for im in gt_data["images"]}
    mapping = match_images(pred.get("images", []), gt_data["images"], match)
    unmatched = [im for im in pred.get("images", []) if im["id"] not in mapping]
    if unmatched and not allow_unmatched:
        names = [im.get("file_name", im["id"]) for im in unmatched[:5]]
        raise EvaluationInputError(
            f"{len(unmatched)} of {len(pred.get('images', []))} pseudo-labelled images are not in the ground truth "
            f"(first: {names}); pass allow_unmatched to drop them, or check the dataset / match mode")
    if unmatched:
        logger.warning("dropping %d pseudo-labelled images that are not in the ground truth", len(unmatched))
    pred_images = {im["id"]: im for im in pred.get("images", [])}
    results, resized = [], 0
    for ann in pred["annotations"]:
        gid = mapping.get(ann["image_id"])
        if gid is None:
            continue
        gimg, pimg = gt_images[gid], pred_images[ann["image_id"]]
        H, W = int(gimg["height"]), int(gimg["width"])
        ph, pw = int(pimg.get("height", H)), int(pimg.get("width", W))
        r: Dict[str, Any] = {"image_id": gid, "category_id": AGNOSTIC_CATEGORY_ID}
        seg = ann.get("segmentation")
        if seg:
            rle = segmentation_to_rle(seg, ph, pw)
            if (ph, pw) != (H, W) or list(rle["size"]) != [H, W]:
                m = cv2.resize(mask_util.decode(rle), (W, H), interpolation=cv2.INTER_NEAREST)
                rle = encode_masks(m[None])[0]
                resized += 1
            else:
                rle = rle_to_json(rle)
            r["segmentation"] = rle
            area = rle_area(rle)
            box = rle_to_bbox(rle) if (ph, pw) != (H, W) or "bbox" not in ann else ann["bbox"]
        else:
            sx, sy = W / pw, H / ph
            x, y, w, h = ann["bbox"]
            box = [x * sx, y * sy, w * sx, h * sy]
            area = box[2] * box[3]
        r["bbox"] = [float(v) for v in box]
        if score_mode == "constant":
            r["score"] = float(constant)
        elif score_mode == "area":
            r["score"] = area / float(H * W)
        else:
            if "score" not in ann:
                raise EvaluationInputError(f"score_mode='field' but annotation {ann.get('id')} has no 'score'")
            r["score"] = float(ann["score"])
        results.append(r)
    labelled = set(mapping.values())
    info = {"pred_images": len(pred_images), "matched_images": len(mapping), "unmatched_images": len(unmatched),
            "gt_images_without_labels": sum(1 for i in gt_images if i not in labelled),
            "annotations": len(results), "resized_masks": resized}
    return results, info


def evaluate_pseudo_labels(
    pred: JsonLike,
    gt: JsonLike,
    score_mode: str = "constant",
    constant: float = 1.0,
    match: str = "auto",
    allow_unmatched: bool = False,
    iou_types: Optional[Sequence[str]] = None,
    max_dets: int = 100,
    with_corloc: bool = False,
) -> Dict[str, Any]:
    """Class-agnostic COCO metrics (and optionally CorLoc) of a pseudo-label annotation JSON.

    Args:
        pred: pseudo-label COCO annotation JSON (path or dict).
        gt: ground-truth COCO JSON (path or dict); categories are collapsed to one.
        score_mode, constant, match, allow_unmatched: see :func:`annotations_to_results`.
        iou_types: default ``bbox`` plus ``segm`` when both sides have masks.
        max_dets: detections per image kept for the metrics.
        with_corloc: also compute CorLoc of the top-scoring label per image.

    Returns:
        ``{"metrics": {iou_type: {metric: %}}, "info": {...}, "corloc": {...}?, "results": [...]}``.
    """
    gt_coco = load_class_agnostic_gt(gt)
    results, info = annotations_to_results(pred, gt_coco, score_mode, constant, match, allow_unmatched)
    if iou_types is None:
        with_masks = bool(results) and all("segmentation" in r for r in results)
        iou_types = ("bbox", "segm") if with_masks and gt_has_masks(gt_coco) else ("bbox",)
    out: Dict[str, Any] = {"metrics": evaluate_coco(gt_coco, results, iou_types, max_dets), "info": info,
                           "results": results}
    if with_corloc:
        out["corloc"] = corloc(gt_coco, results)
    return out
