"""Many-to-one matching of predicted cluster ids to dataset categories, and the matched COCO metrics.

A U2Seg detector names its detections with cluster ids, which mean nothing to a dataset. Before COCO
metrics, every cluster id is mapped to a category, from the evaluation set itself:

1. keep the detections with ``score >= conf``;
2. for each kept detection, every ground-truth instance of its image whose IoU with it (box or mask)
   is strictly above ``iou`` casts one vote (cluster id -> that instance's category);
3. each cluster id maps to the category with the most votes (the vote histogram of the cluster); a tie
   goes to the smallest category id; several clusters may map to one category (many-to-one);
4. detections of clusters that received no vote have no category and are left out; the others take
   their cluster's category, and standard per-category COCO AP/AR follow.

Crowd and ``ignore`` regions are not instances: they cast no vote (the published evaluation lets them
vote; with their large boxes they rarely pass the IoU threshold).
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Union

import numpy as np
import torch

from cutler.evaluation.coco_eval import (JsonLike, check_result_image_ids, build_coco, evaluate_coco_detailed,
                                         load_json, load_results, normalize_gt)
from cutler.structures.boxes import pairwise_iou, xywh_to_xyxy
from cutler.structures.rle import rle_iou, segmentation_to_rle

MATCH_IOU_TYPES = ("bbox", "segm")


@dataclass
class ClusterMapping:
    """The result of :func:`match_clusters`.

    mapping: cluster id -> category id (only clusters that received votes); votes: cluster id ->
    {category id: votes}; the thresholds used; kept: detections with ``score >= conf``; voting: kept
    detections that cast at least one vote.
    """

    mapping: Dict[int, int]
    votes: Dict[int, Dict[int, int]]
    conf: float
    iou: float
    iou_type: str
    kept: int = 0
    voting: int = 0
    clusters_seen: List[int] = field(default_factory=list)

    @property
    def unmatched(self) -> List[int]:
        """Cluster ids that predicted something but received no vote (their detections are left out)."""
        return sorted(set(self.clusters_seen) - set(self.mapping))

    def as_json(self, category_names: Mapping[int, str] | None = None) -> Dict[str, Any]:
        """A JSON-ready record: thresholds, counts, and per cluster its category (and name) and votes."""
        names = category_names or {}
        clusters = {}
        for cid in sorted(set(self.clusters_seen) | set(self.mapping)):
            cat = self.mapping.get(cid)
            clusters[str(cid)] = {"category_id": cat, "category": names.get(cat) if cat is not None else None,
                                  "votes": {str(k): v for k, v in sorted(self.votes.get(cid, {}).items())}}
        return {"conf": self.conf, "iou": self.iou, "iou_type": self.iou_type, "kept_detections": self.kept,
                "voting_detections": self.voting, "matched_clusters": len(self.mapping),
                "unmatched_clusters": self.unmatched, "categories_covered": len(set(self.mapping.values())),
                "clusters": clusters}


def _rles(items: Sequence[Mapping[str, Any]], height: int, width: int) -> List[Dict[str, Any]]:
    return [segmentation_to_rle(it["segmentation"], height, width) for it in items]


def annotation_iou(dets: Sequence[Mapping[str, Any]], gts: Sequence[Mapping[str, Any]], iou_type: str,
                 height: int = 0, width: int = 0) -> np.ndarray:
    """``(len(dets), len(gts))`` IoU of detections with ground-truth annotations of one image.

    ``bbox``: XYWH boxes; ``segm``: their masks (polygons or RLE; ``height``/``width`` = the image size).
    """
    if not dets or not gts:
        return np.zeros((len(dets), len(gts)))
    if iou_type == "bbox":
        d, g = (xywh_to_xyxy(torch.tensor([list(map(float, x["bbox"])) for x in items], dtype=torch.float64))
                for items in (dets, gts))
        return pairwise_iou(d, g).numpy()
    if iou_type == "segm":
        missing = [x for x in list(dets) + list(gts) if not x.get("segmentation")]
        if missing:
            raise ValueError(f"mask IoU matching needs segmentations; image {missing[0].get('image_id')} has an "
                             "instance without one (match on boxes instead)")
        return rle_iou(_rles(dets, height, width), _rles(gts, height, width))
    raise ValueError(f"iou_type must be one of {MATCH_IOU_TYPES}, got {iou_type!r}")


def match_clusters(gt: JsonLike, results: Union[JsonLike, Sequence[Mapping[str, Any]]], conf: float, iou: float,
                   iou_type: str = "bbox") -> ClusterMapping:
    """Map each predicted cluster id to a ground-truth category by IoU votes (module docstring, steps 1-3).

    Args:
        gt: COCO ground truth with categories (path, dict); ``ignore=1`` annotations count as crowd.
        results: COCO detection results whose ``category_id`` is the cluster id.
        conf: detections with ``score >= conf`` vote.
        iou: a detection votes for every non-crowd instance with IoU strictly above this.
        iou_type: ``"bbox"`` or ``"segm"``.

    Returns:
        :class:`ClusterMapping`.
    """
    data = normalize_gt(gt, class_agnostic=False)
    results = load_results(results)
    check_result_image_ids(results, build_coco({"images": data["images"], "annotations": [], "categories": []}))
    sizes = {im["id"]: (im.get("height", 0), im.get("width", 0)) for im in data["images"]}
    gt_by_image: Dict[Any, List[Mapping[str, Any]]] = defaultdict(list)
    for a in data["annotations"]:
        if not a.get("iscrowd", 0):
            gt_by_image[a["image_id"]].append(a)
    kept_by_image: Dict[Any, List[Mapping[str, Any]]] = defaultdict(list)
    seen = set()
    for r in results:
        seen.add(int(r["category_id"]))
        if float(r["score"]) >= conf:
            kept_by_image[r["image_id"]].append(r)
    votes: Dict[int, Counter] = defaultdict(Counter)
    kept = voting = 0
    for image_id, dets in kept_by_image.items():
        kept += len(dets)
        gts = gt_by_image.get(image_id, [])
        ious = annotation_iou(dets, gts, iou_type, *sizes[image_id])
        for det, row in zip(dets, ious):
            hits = np.flatnonzero(row > iou)
            voting += bool(hits.size)
            for j in hits:
                votes[int(det["category_id"])][int(gts[j]["category_id"])] += 1
    # max count, then the smallest category id on ties
    mapping = {cid: min(hist, key=lambda c: (-hist[c], c)) for cid, hist in votes.items()}
    return ClusterMapping(mapping, {c: dict(h) for c, h in votes.items()}, float(conf), float(iou), iou_type,
                          kept, voting, sorted(seen))


def apply_mapping(results: Iterable[Mapping[str, Any]], mapping: Mapping[int, int]) -> List[Dict[str, Any]]:
    """Detections with their cluster id replaced by the mapped category; unmatched clusters' are dropped."""
    out = []
    for r in results:
        cat = mapping.get(int(r["category_id"]))
        if cat is not None:
            out.append({**r, "category_id": cat})
    return out


def evaluate_matched(gt: JsonLike, results: Union[JsonLike, Sequence[Mapping[str, Any]]], conf: float, iou: float,
                     match_iou_type: str = "bbox", iou_types: Sequence[str] = ("bbox",), max_dets: int = 100
                     ) -> Dict[str, Any]:
    """Match cluster ids to categories, then per-category COCO metrics and the class-agnostic ones.

    Args:
        gt: COCO ground truth with categories; results: detections named by cluster id.
        conf, iou, match_iou_type: the matching (:func:`match_clusters`).
        iou_types: the COCO evaluations to run (``"bbox"``, ``"segm"``).
        max_dets: detections per image.

    Returns:
        ``{"matched": {iou_type: summary}, "per_category": {iou_type: {cat_id: {...}}}, "agnostic":
        {iou_type: summary}, "mapping": ClusterMapping}``.
    """
    data = load_json(gt) if isinstance(gt, (str, os.PathLike)) else gt
    results = load_results(results)
    mapping = match_clusters(data, results, conf, iou, match_iou_type)
    matched, per_category = evaluate_coco_detailed(data, apply_mapping(results, mapping.mapping), iou_types,
                                                   max_dets, class_agnostic=False)
    agnostic, _ = evaluate_coco_detailed(data, results, iou_types, max_dets, class_agnostic=True)
    return {"matched": matched, "per_category": per_category, "agnostic": agnostic, "mapping": mapping}
