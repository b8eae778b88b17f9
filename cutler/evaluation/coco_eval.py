"""COCO evaluation (boxes and masks) with pycocotools semantics, class-agnostic or per category.

Zero-shot protocol (CutLER's): every ground-truth category is mapped to one
class ("object"), every prediction is set to that class, and COCO AP/AR are computed with at most
``max_dets`` detections per image. :func:`evaluate_coco_detailed` also evaluates per category (U2Seg's
matched evaluation) and reports each category's AP/AR.

Ground-truth conventions:

* ``iscrowd=1`` annotations are crowd regions, exactly as in COCO: detections matched to them count
  neither as true nor as false positives.
* ``ignore=1`` annotations (UVO, some converted sets) are treated as crowd regions too. pycocotools
  itself overwrites ``ignore`` with ``iscrowd``, so without this mapping they would silently count as
  ordinary objects.
* Images without annotations stay in the evaluation: every detection on them is a false positive.

Metric values are percentages (0-100, the unit of the paper's tables). A metric that is undefined
because no ground truth falls into its area range is ``nan`` (pycocotools reports ``-1``).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..structures.rle import rle_area, rle_to_bbox, segmentation_to_rle

AGNOSTIC_CATEGORY_ID = 1
AGNOSTIC_CATEGORY = {"id": AGNOSTIC_CATEGORY_ID, "name": "object", "supercategory": "object"}

#: Metric names in the order of pycocotools' summary.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")

JsonLike = Union[str, os.PathLike, Mapping[str, Any]]


class EvaluationInputError(ValueError):
    """Predictions or ground truth that cannot be evaluated together (the message says why)."""


def load_json(source: JsonLike) -> Dict[str, Any]:
    """A COCO dict from a path or a mapping (a mapping is returned as a plain dict, not copied deeply)."""
    if isinstance(source, Mapping):
        return dict(source)
    with open(source, encoding="utf-8") as f:
        return json.load(f)


def _ann_area(ann: Mapping[str, Any], height: Optional[int], width: Optional[int]) -> float:
    seg = ann.get("segmentation")
    if seg and height and width:
        return rle_area(segmentation_to_rle(seg, height, width))
    x, y, w, h = ann["bbox"]
    return float(w) * float(h)


def to_class_agnostic(gt: JsonLike) -> Dict[str, Any]:
    """A class-agnostic copy of a COCO ground-truth dict.

    Every annotation gets ``category_id = 1``, ``ignore=1`` becomes ``iscrowd=1``, a missing ``iscrowd``
    becomes 0, a missing ``area`` is computed (mask area when a segmentation and the image size are
    known, else box area), and annotation ids are renumbered 1..N when absent or duplicated.
    The input is not modified.
    """
    return normalize_gt(gt, class_agnostic=True)


def normalize_gt(gt: JsonLike, class_agnostic: bool) -> Dict[str, Any]:
    """:func:`to_class_agnostic`, or with ``class_agnostic=False`` the same clean-up keeping every
    annotation's category and the category list."""
    data = load_json(gt)
    for key in ("images", "annotations"):
        if key not in data:
            raise EvaluationInputError(f"ground truth has no '{key}' list (keys: {sorted(data)})")
    sizes = {img["id"]: (img.get("height"), img.get("width")) for img in data["images"]}
    anns = []
    ids = [a.get("id") for a in data["annotations"]]
    renumber = any(i is None for i in ids) or len(set(ids)) != len(ids)
    for k, ann in enumerate(data["annotations"]):
        a = dict(ann)
        if class_agnostic:
            a["category_id"] = AGNOSTIC_CATEGORY_ID
        a["iscrowd"] = int(bool(a.get("iscrowd", 0)) or bool(a.get("ignore", 0)))
        a.pop("ignore", None)
        if "bbox" not in a:
            if not a.get("segmentation"):
                raise EvaluationInputError(f"annotation {a.get('id')} has neither bbox nor segmentation")
            h, w = sizes.get(a["image_id"], (None, None))
            a["bbox"] = rle_to_bbox(segmentation_to_rle(a["segmentation"], h, w))
        if "area" not in a:
            a["area"] = _ann_area(a, *sizes.get(a["image_id"], (None, None)))
        if renumber:
            a["id"] = k + 1
        anns.append(a)
    out = {k: v for k, v in data.items() if k not in ("annotations", "categories")}
    out["annotations"] = anns
    out["categories"] = [dict(AGNOSTIC_CATEGORY)] if class_agnostic else copy.deepcopy(data.get("categories", []))
    return out


def build_coco(dataset: Mapping[str, Any]) -> COCO:
    """A pycocotools ``COCO`` object from an in-memory dict, without the console chatter."""
    coco = COCO()
    coco.dataset = dict(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_class_agnostic_gt(gt: Union[JsonLike, COCO]) -> COCO:
    """Ground truth as a class-agnostic ``COCO`` object (a ``COCO`` object is converted too)."""
    if isinstance(gt, COCO):
        gt = gt.dataset
    return build_coco(to_class_agnostic(gt))


def load_results(results: Union[str, os.PathLike, Sequence[Mapping[str, Any]]]) -> Sequence[Mapping[str, Any]]:
    """COCO detection results from a JSON file or as given; raises if they are not a list."""
    if isinstance(results, (str, os.PathLike)):
        with open(results, encoding="utf-8") as f:
            results = json.load(f)
    if not isinstance(results, (list, tuple)):
        raise EvaluationInputError(f"results must be a list of detections, got {type(results).__name__}")
    return results


def check_result_image_ids(results: Sequence[Mapping[str, Any]], gt: COCO) -> None:
    """Raise :class:`EvaluationInputError` when predictions name images the ground truth lacks."""
    known = set(gt.getImgIds())
    unknown = sorted({r["image_id"] for r in results} - known, key=str)
    if unknown:
        raise EvaluationInputError(
            f"{len(unknown)} image id(s) in the predictions are not in the ground truth "
            f"(first: {unknown[:5]}); were the predictions made on another dataset or split? "
            f"(ground truth has {len(known)} images)"
        )


def _results_coco(gt: COCO, results: Sequence[Mapping[str, Any]], iou_type: str, class_agnostic: bool = True) -> COCO:
    """The detections as a ``COCO`` object, built like ``COCO.loadRes`` but also for an empty list.

    For ``segm`` the area is the mask area and ``bbox`` is dropped first, as Detectron2 does, so that a
    detection falls into the small/medium/large range of its mask rather than of its box. Detections keep
    their ``category_id`` unless ``class_agnostic``.
    """
    anns = []
    for k, r in enumerate(results):
        a = {"id": k + 1, "image_id": r["image_id"],
             "category_id": AGNOSTIC_CATEGORY_ID if class_agnostic else r["category_id"],
             "score": float(r["score"]), "iscrowd": 0}
        if iou_type == "bbox":
            x, y, w, h = (float(v) for v in r["bbox"])
            a["bbox"] = [x, y, w, h]
            a["area"] = w * h
        else:
            seg = r.get("segmentation")
            if seg is None:
                raise EvaluationInputError(f"segm evaluation: detection {k} (image {r['image_id']}) has no segmentation")
            img = gt.imgs[r["image_id"]]
            rle = segmentation_to_rle(seg, img.get("height"), img.get("width"))
            a["segmentation"] = rle
            a["area"] = rle_area(rle)
            a["bbox"] = rle_to_bbox(rle)
        anns.append(a)
    return build_coco({"images": list(gt.dataset["images"]), "categories": copy.deepcopy(gt.dataset["categories"]),
                       "annotations": anns})


def _summarize(E: COCOeval) -> Dict[str, float]:
    """The 12 summary numbers of ``COCOeval.summarize`` (in %), read from ``E.eval`` for any ``maxDets``.

    pycocotools' own summary hard-codes 100 detections for AP; this reads the last ``maxDets`` entry.
    """
    p = E.params
    precision, recall = E.eval["precision"], E.eval["recall"]  # [T,R,K,A,M], [T,K,A,M]

    def stat(ap: bool, iou: Optional[float] = None, area: str = "all", max_det: Optional[int] = None) -> float:
        a = p.areaRngLbl.index(area)
        m = p.maxDets.index(max_det if max_det is not None else p.maxDets[-1])
        s = precision[..., a, m] if ap else recall[..., a, m]
        if iou is not None:
            s = s[np.where(np.isclose(p.iouThrs, iou))[0]]
        s = s[s > -1]
        return float(np.mean(s)) * 100.0 if s.size else math.nan

    d1, d10, d100 = p.maxDets
    return {
        "AP": stat(True), "AP50": stat(True, 0.5), "AP75": stat(True, 0.75),
        "APs": stat(True, area="small"), "APm": stat(True, area="medium"), "APl": stat(True, area="large"),
        "AR1": stat(False, max_det=d1), "AR10": stat(False, max_det=d10), "AR100": stat(False, max_det=d100),
        "ARs": stat(False, area="small"), "ARm": stat(False, area="medium"), "ARl": stat(False, area="large"),
    }


def _top_k_per_image(results: Sequence[Mapping[str, Any]], k: int) -> List[Mapping[str, Any]]:
    by_image: Dict[Any, List[Mapping[str, Any]]] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    out: List[Mapping[str, Any]] = []
    for dets in by_image.values():
        # stable sort: ties keep their input order, as pycocotools does
        out.extend(sorted(dets, key=lambda r: -float(r["score"]))[:k])
    return out


def evaluate_coco(
    gt: Union[JsonLike, COCO],
    results: Union[JsonLike, Sequence[Mapping[str, Any]]],
    iou_types: Iterable[str] = IOU_TYPES,
    max_dets: int = 100,
) -> Dict[str, Dict[str, float]]:
    """Class-agnostic COCO AP/AR of ``results`` against ``gt``.

    Args:
        gt: COCO ground truth (path, dict or ``COCO``); its categories are collapsed to one
            (see :func:`to_class_agnostic`). Images need ``height``/``width`` for ``segm``.
        results: COCO detection results (path to a JSON list, or the list): dicts with ``image_id``,
            ``score``, ``bbox`` (XYWH, pixels) and, for ``segm``, ``segmentation`` (RLE or polygons).
            ``category_id`` is ignored (set to the single class).
        iou_types: any of ``"bbox"``, ``"segm"``.
        max_dets: detections per image kept (highest scores) and the last AR/AP ``maxDets``
            (``maxDets = [1, 10, max_dets]``).

    Returns:
        ``{iou_type: {metric: value in %}}`` with the metrics of :data:`METRIC_NAMES`; empty predictions
        give zeros where ground truth exists.

    Raises:
        EvaluationInputError: predictions for image ids the ground truth lacks, or ``segm`` requested
        for detections without masks.
    """
    return evaluate_coco_detailed(gt, results, iou_types, max_dets, class_agnostic=True)[0]


def evaluate_coco_detailed(
    gt: Union[JsonLike, COCO],
    results: Union[JsonLike, Sequence[Mapping[str, Any]]],
    iou_types: Iterable[str] = IOU_TYPES,
    max_dets: int = 100,
    class_agnostic: bool = True,
) -> Tuple[Dict[str, Dict[str, float]], Dict[str, Dict[int, Dict[str, float]]]]:
    """COCO AP/AR, class-agnostic (:func:`evaluate_coco`) or per category, with per-category figures.

    Args:
        gt, results, iou_types, max_dets: as :func:`evaluate_coco`.
        class_agnostic: False keeps the categories of ``gt`` and of the detections (``category_id`` must
            then be one of ``gt``'s): the summary is the mean over categories with ground truth, as COCO's.

    Returns:
        ``(summary, per_category)``: ``summary`` as :func:`evaluate_coco`; ``per_category[iou_type][cat_id]``
        = ``{"AP", "AP50", "AR100"}`` in % (``nan`` for a category without ground truth).
    """
    if class_agnostic:
        gt_coco = gt if isinstance(gt, COCO) and _is_agnostic(gt) else load_class_agnostic_gt(gt)
    else:
        gt_coco = build_coco(normalize_gt(gt.dataset if isinstance(gt, COCO) else gt, class_agnostic=False))
    results = load_results(results)
    check_result_image_ids(results, gt_coco)
    if not class_agnostic:
        known = set(gt_coco.getCatIds())
        unknown = sorted({r["category_id"] for r in results} - known)
        if unknown:
            raise EvaluationInputError(f"{len(unknown)} category id(s) in the predictions are not ground-truth "
                                       f"categories (first: {unknown[:5]}; ground truth has {len(known)})")
    results = _top_k_per_image(results, max_dets)
    out: Dict[str, Dict[str, float]] = {}
    per_category: Dict[str, Dict[int, Dict[str, float]]] = {}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
        gt_i = _with_box_masks(gt_coco) if iou_type == "segm" else gt_coco
        dt_coco = _results_coco(gt_i, results, iou_type, class_agnostic)
        E = COCOeval(gt_i, dt_coco, iou_type)
        E.params.maxDets = [1, 10, int(max_dets)]
        with contextlib.redirect_stdout(io.StringIO()):
            E.evaluate()
            E.accumulate()
        out[iou_type] = _summarize(E)
        per_category[iou_type] = _per_category(E)
    return out, per_category


def _per_category(E: COCOeval) -> Dict[int, Dict[str, float]]:
    """``{cat_id: {"AP", "AP50", "AR100"}}`` (%) from an accumulated ``COCOeval`` (area "all", last maxDets)."""
    p = E.params
    precision, recall = E.eval["precision"], E.eval["recall"]  # [T,R,K,A,M], [T,K,A,M]
    a, m = p.areaRngLbl.index("all"), len(p.maxDets) - 1
    t50 = np.where(np.isclose(p.iouThrs, 0.5))[0]

    def mean(values: np.ndarray) -> float:
        values = values[values > -1]
        return float(np.mean(values)) * 100.0 if values.size else math.nan

    return {int(cat): {"AP": mean(precision[:, :, k, a, m]), "AP50": mean(precision[t50, :, k, a, m]),
                       "AR100": mean(recall[:, k, a, m])} for k, cat in enumerate(p.catIds)}


def _with_box_masks(gt: COCO) -> COCO:
    """``gt`` where annotations without a segmentation (often crowd boxes) get their box as polygon mask.

    pycocotools' segm evaluation needs a mask on every ground-truth annotation; a box-shaped mask is the
    only faithful stand-in (``COCO.loadRes`` does the same for box-only detections).
    """
    anns = gt.dataset["annotations"]
    if all(a.get("segmentation") for a in anns):
        return gt
    fixed = []
    for a in anns:
        if not a.get("segmentation"):
            x, y, w, h = a["bbox"]
            a = {**a, "segmentation": [[x, y, x, y + h, x + w, y + h, x + w, y]]}
        fixed.append(a)
    return build_coco({**gt.dataset, "annotations": fixed})


def _is_agnostic(gt: COCO) -> bool:
    cats = gt.dataset.get("categories", [])
    return len(cats) == 1 and cats[0]["id"] == AGNOSTIC_CATEGORY_ID and all(
        a["category_id"] == AGNOSTIC_CATEGORY_ID and "ignore" not in a for a in gt.dataset["annotations"]
    )


def gt_has_masks(gt: Union[JsonLike, COCO]) -> bool:
    """Whether any ground-truth annotation carries a segmentation (so ``segm`` evaluation is meaningful)."""
    data = gt.dataset if isinstance(gt, COCO) else load_json(gt)
    return any(a.get("segmentation") for a in data.get("annotations", []))
