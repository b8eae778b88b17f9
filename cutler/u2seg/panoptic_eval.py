"""Panoptic and semantic metrics with cluster ids: PQ / SQ / RQ, PixelAcc / mIoU after Hungarian matching.

**PQ** (Kirillov et al.; the definitions of panopticapi's ``pq_compute``): per image, a predicted and a
ground-truth segment of the same category match when their IoU exceeds 0.5, where the union leaves out the
predicted pixels that fall on ground-truth void (id 0). Matches are true positives (their IoU summed),
unmatched non-crowd ground-truth segments false negatives, and unmatched predictions false positives unless
more than half of them lies on void or on crowd regions of their category. Per category ``PQ = sum IoU /
(TP + FP/2 + FN/2)``, ``SQ = sum IoU / TP``, ``RQ = TP / (TP + FP/2 + FN/2)``; "All", "Things" and "Stuff"
average the categories with ``TP + FP + FN > 0``. Checked against torchmetrics' ``PanopticQuality`` in the
tests.

**Cluster ids** mean nothing to a dataset, so predictions are first relabelled: thing clusters through the
many-to-one matching of :mod:`cutler.u2seg.matching` (instance votes), stuff clusters through a one-to-one
Hungarian matching of pixel overlaps with the stuff categories (:func:`hungarian_match`). Segments of
clusters left without a category become void (they count neither as hits nor as false positives).

**PixelAcc / mIoU** (STEGO's protocol): a confusion matrix of predicted clusters against ground-truth
classes over the dataset, a one-to-one assignment maximising the matched pixels (scipy's
``linear_sum_assignment``); pixels of unmatched clusters count as errors. PixelAcc = matched pixels / labelled
pixels; mIoU = mean over ground-truth classes present (in the labels or the matched predictions) of
``TP / (TP + FP + FN)``. (STEGO's code, with more clusters than classes, also averages in a zero for a
pseudo-class holding the unmatched clusters; that term is not added here.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .panoptic import VOID

IOU_MATCH = 0.5


def _segment_index(ids: np.ndarray, segments: Sequence[Mapping[str, Any]], what: str) -> Tuple[np.ndarray, List]:
    """Pixel -> row index into ``[void] + segments`` (0 = void); raises on ids without segment info."""
    seg_ids = np.asarray([int(s["id"]) for s in segments], dtype=np.int64)
    if len(set(seg_ids.tolist())) != len(seg_ids):
        raise ValueError(f"{what}: duplicate segment ids in segments_info")
    keys = np.concatenate([[VOID], seg_ids])
    order = np.argsort(keys)
    pos = np.searchsorted(keys[order], ids)
    pos = np.clip(pos, 0, len(keys) - 1)
    found = keys[order][pos] == ids
    if not found.all():
        missing = np.unique(ids[~found])[:5].tolist()
        raise ValueError(f"{what}: segment ids {missing} are in the PNG but not in segments_info")
    return order[pos], [None] + list(segments)


@dataclass
class PanopticQuality:
    """Accumulates PQ statistics over images; :meth:`compute` gives the averages.

    Args:
        categories: ``[{"id", "isthing", "name"?}]`` of the ground truth (the only categories predictions
            may use).
    """

    categories: Sequence[Mapping[str, Any]]
    iou_sum: Dict[int, float] = field(default_factory=dict)
    tp: Dict[int, int] = field(default_factory=dict)
    fp: Dict[int, int] = field(default_factory=dict)
    fn: Dict[int, int] = field(default_factory=dict)

    def __post_init__(self):
        self.isthing = {int(c["id"]): bool(c.get("isthing", 0)) for c in self.categories}
        for d in (self.iou_sum, self.tp, self.fp, self.fn):
            for c in self.isthing:
                d.setdefault(c, 0)

    def update(self, gt_ids: np.ndarray, gt_segments: Sequence[Mapping[str, Any]], pred_ids: np.ndarray,
               pred_segments: Sequence[Mapping[str, Any]]) -> None:
        """Add one image: ``(H, W)`` segment-id maps and their ``segments_info`` (``id``, ``category_id``;
        ground truth also ``iscrowd``)."""
        if gt_ids.shape != pred_ids.shape:
            raise ValueError(f"ground truth {gt_ids.shape} and prediction {pred_ids.shape} differ in size")
        for s in pred_segments:
            if int(s["category_id"]) not in self.isthing:
                raise KeyError(f"predicted segment {s['id']} has category {s['category_id']}, not a ground-truth "
                               "category (map cluster ids to categories first)")
        gi, gsegs = _segment_index(np.asarray(gt_ids, np.int64), gt_segments, "ground truth")
        pi, psegs = _segment_index(np.asarray(pred_ids, np.int64), pred_segments, "prediction")
        ng, npr = len(gsegs), len(psegs)
        inter = np.bincount((gi * npr + pi).ravel(), minlength=ng * npr).reshape(ng, npr)
        gt_area, pred_area, pred_on_void = inter.sum(1), inter.sum(0), inter[0]
        gcat = np.asarray([-1] + [int(s["category_id"]) for s in gsegs[1:]])
        pcat = np.asarray([-2] + [int(s["category_id"]) for s in psegs[1:]])
        crowd = np.asarray([False] + [bool(s.get("iscrowd", 0)) for s in gsegs[1:]])
        gt_matched = np.zeros(ng, bool)
        pred_matched = np.zeros(npr, bool)
        for g, p in zip(*np.nonzero(inter[1:, 1:])):
            g, p = g + 1, p + 1
            if crowd[g] or gcat[g] != pcat[p]:
                continue
            union = pred_area[p] + gt_area[g] - inter[g, p] - pred_on_void[p]
            iou = inter[g, p] / union
            if iou > IOU_MATCH:  # at most one partner each: two IoUs above 0.5 cannot share a segment
                gt_matched[g] = pred_matched[p] = True
                self.tp[int(gcat[g])] += 1
                self.iou_sum[int(gcat[g])] += float(iou)
        for g in range(1, ng):
            if not gt_matched[g] and not crowd[g]:
                self.fn[int(gcat[g])] += 1
        crowd_rows = np.flatnonzero(crowd)
        for p in range(1, npr):
            if pred_matched[p] or pred_area[p] == 0:
                continue
            on_crowd = sum(int(inter[g, p]) for g in crowd_rows if gcat[g] == pcat[p])
            if (pred_on_void[p] + on_crowd) / pred_area[p] > IOU_MATCH:
                continue
            self.fp[int(pcat[p])] += 1

    def per_category(self) -> Dict[int, Dict[str, float]]:
        """``{category: {"pq", "sq", "rq", "tp", "fp", "fn"}}`` (qualities in [0, 1])."""
        out = {}
        for c in self.isthing:
            tp, fp, fn, iou = self.tp[c], self.fp[c], self.fn[c], self.iou_sum[c]
            denom = tp + 0.5 * fp + 0.5 * fn
            out[c] = {"pq": iou / denom if denom else 0.0, "sq": iou / tp if tp else 0.0,
                      "rq": tp / denom if denom else 0.0, "tp": tp, "fp": fp, "fn": fn}
        return out

    def compute(self) -> Dict[str, Dict[str, float]]:
        """``{"All" | "Things" | "Stuff": {"pq", "sq", "rq", "n"}}``, averages over categories with
        ``TP + FP + FN > 0`` (qualities in [0, 1]; 0 when no category qualifies)."""
        per = self.per_category()
        out = {}
        for name, keep in (("All", lambda c: True), ("Things", lambda c: self.isthing[c]),
                           ("Stuff", lambda c: not self.isthing[c])):
            cats = [c for c, v in per.items() if keep(c) and v["tp"] + v["fp"] + v["fn"] > 0]
            n = len(cats)
            out[name] = {k: (sum(per[c][k] for c in cats) / n if n else 0.0) for k in ("pq", "sq", "rq")}
            out[name]["n"] = n
        return out


def pq_summary(result: Mapping[str, Mapping[str, float]]) -> Dict[str, float]:
    """Flat ``{"PQ", "SQ", "RQ", "PQ_th", ..., "RQ_st"}`` in percent from :meth:`PanopticQuality.compute`."""
    out = {}
    for name, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for k in ("pq", "sq", "rq"):
            out[k.upper() + suffix] = 100.0 * float(result[name][k])
    return out


# --------------------------------------------------------------------------------- Hungarian matching
def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_pred: int, num_gt: int, ignore: Optional[int] = 255
                     ) -> np.ndarray:
    """``(num_pred, num_gt)`` int64 pixel counts of (predicted cluster, ground-truth class) pairs; ground-truth
    pixels equal to ``ignore`` (or outside ``[0, num_gt)``) and predictions outside ``[0, num_pred)`` are left out."""
    pred, gt = np.asarray(pred, np.int64).ravel(), np.asarray(gt, np.int64).ravel()
    if pred.shape != gt.shape:
        raise ValueError(f"prediction ({pred.size} px) and ground truth ({gt.size} px) differ in size")
    keep = (gt >= 0) & (gt < num_gt) & (pred >= 0) & (pred < num_pred)
    if ignore is not None:
        keep &= gt != ignore
    return np.bincount(pred[keep] * num_gt + gt[keep], minlength=num_pred * num_gt).reshape(num_pred, num_gt)


def hungarian_match(confusion: np.ndarray) -> Dict[int, int]:
    """One-to-one assignment of rows (clusters) to columns (classes) maximising the matched counts
    (``scipy.optimize.linear_sum_assignment``); rows left over are absent from the result."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(np.asarray(confusion, dtype=np.float64), maximize=True)
    return {int(r): int(c) for r, c in zip(rows, cols)}


def hungarian_semantic_metrics(confusion: np.ndarray) -> Dict[str, Any]:
    """PixelAcc and mIoU (in percent) of a ``(clusters, classes)`` confusion matrix after the one-to-one matching.

    Returns:
        ``{"PixelAcc", "mIoU", "IoU": per-class list (NaN for a class absent from labels and predictions),
        "mapping": {cluster: class}}``.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    mapping = hungarian_match(confusion)
    num_classes = confusion.shape[1]
    matched = np.zeros((num_classes, num_classes))  # rows: the cluster assigned to class i
    for r, c in mapping.items():
        matched[c] = confusion[r]
    tp = np.diag(matched)
    predicted_as = matched.sum(1)  # pixels predicted as class i (by its matched cluster)
    labelled = confusion.sum(0)  # pixels of class i, whatever predicted them
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (predicted_as + labelled - tp)
    total = confusion.sum()
    return {"PixelAcc": 100.0 * tp.sum() / total if total else 0.0,
            "mIoU": 100.0 * float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
            "IoU": [None if np.isnan(v) else 100.0 * float(v) for v in iou], "mapping": mapping}


def relabel_segments(ids: np.ndarray, segments: Iterable[Mapping[str, Any]], mapping: Mapping[int, Optional[int]]
                     ) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """Predicted segments with their (cluster) category replaced through ``mapping``; segments whose category
    maps to nothing become void. Segments of one non-thing category are merged into one (a stuff class is
    one segment per image).

    Returns:
        ``(ids, segments_info)``.
    """
    ids = np.array(ids, dtype=np.int64, copy=True)
    out: List[Dict[str, Any]] = []
    first_of_stuff: Dict[int, Dict[str, Any]] = {}
    for s in segments:
        cat = mapping.get(int(s["category_id"]))
        sid = int(s["id"])
        if cat is None:
            ids[ids == sid] = VOID
            continue
        if not s.get("isthing", True) and cat in first_of_stuff:
            ids[ids == sid] = first_of_stuff[cat]["id"]
            continue
        seg = {k: v for k, v in s.items() if k not in ("area", "bbox")}
        seg["category_id"] = int(cat)
        out.append(seg)
        if not s.get("isthing", True):
            first_of_stuff[cat] = seg
    return ids, out


__all__ = ["PanopticQuality", "confusion_matrix", "hungarian_match", "hungarian_semantic_metrics", "pq_summary",
           "relabel_segments"]
