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
import os
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


# ------------------------------------------------------------------------------------- over a dataset
PUBLISHED_PANOPTIC = {
    # (benchmark, row) -> (PQ, SQ, RQ) as published (zero-shot rows: trained on ImageNet)
    ("coco", "CutLER+STEGO"): (12.4, 64.9, 15.5), ("coco", "U2Seg (800 clusters, COCO+IN)"): (16.1, 71.1, 19.9),
    ("coco", "U2Seg (800 clusters, IN, zero-shot)"): (11.9, 65.9, 14.8),
    ("coco", "U2Seg (300 clusters, IN, zero-shot)"): (11.1, 60.1, 13.7),
    ("cityscapes", "CutLER+STEGO"): (12.4, 36.1, 15.2), ("cityscapes", "U2Seg (800 clusters, COCO+IN)"): (17.6, 52.7, 21.7),
    ("cityscapes", "U2Seg (800 clusters, IN, zero-shot)"): (15.7, 46.6, 19.8),
    ("cityscapes", "U2Seg (300 clusters, IN, zero-shot)"): (15.3, 48.8, 19.5),
}
PUBLISHED_SEMANTIC = {("cocostuff27", "STEGO"): (56.9, 28.2), ("cocostuff27", "U2Seg"): (63.9, 30.2)}  # PixelAcc, mIoU


def predict_panoptic(model: Any, images: Sequence[Mapping[str, Any]], image_root: Any, out_dir: Any,
                     num_things: int, min_size: int = 800, max_size: int = 1333, max_dets: int = 100,
                     progress: bool = True) -> Dict[str, Any]:
    """Run a Panoptic FPN over ``images`` (COCO image entries) and write cluster-level predictions.

    Writes ``out_dir/panoptic/<stem>.png`` with ``records.jsonl`` (segments: thing category = cluster id
    ``class + 1``, stuff category = ``num_things + semantic class``, plus ``isthing``), and
    ``instances.jsonl`` (the COCO detection results with masks, for the thing matching). Images already in
    ``records.jsonl`` are skipped (resume).

    Returns:
        ``{"images", "done_before"}``.
    """
    import json
    from pathlib import Path

    import torch
    from tqdm import tqdm

    from cutler.evaluation.inference import instances_to_coco_results, prepare_input
    from cutler.maskcut.writer import read_failures
    from cutler.utils.image import read_image_rgb

    from .panoptic import write_panoptic_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rec_path, inst_path = out_dir / "records.jsonl", out_dir / "instances.jsonl"
    done = {r["image_id"] for r in read_failures(rec_path)}
    model.eval()
    with open(rec_path, "a", encoding="utf-8") as rec_log, open(inst_path, "a", encoding="utf-8") as inst_log:
        for im in tqdm([im for im in images if im["id"] not in done], desc="panoptic inference", disable=not progress):
            image = read_image_rgb(Path(image_root) / im["file_name"])
            with torch.inference_mode():
                out = model([prepare_input(image, min_size, max_size)])[0]
            seg, info = out["panoptic_seg"]
            segs = []
            for s in info:
                cat = int(s["category_id"]) + 1 if s["isthing"] else num_things + int(s["category_id"])
                segs.append({"id": int(s["id"]), "category_id": cat, "isthing": bool(s["isthing"]),
                             **({"score": float(s["score"])} if s["isthing"] else {})})
            stem = os.path.splitext(im["file_name"])[0]
            write_panoptic_png(out_dir / "panoptic" / f"{stem}.png", seg.cpu().numpy())
            for r in instances_to_coco_results(out["instances"], im["id"], max_dets, True, None):
                inst_log.write(json.dumps(r) + "\n")
            inst_log.flush()
            rec_log.write(json.dumps({"image_id": im["id"], "file_name": f"{stem}.png", "segments_info": segs}) + "\n")
            rec_log.flush()
    return {"images": len(images), "done_before": len(done)}


def _gt_instances(gt: Mapping[str, Any], gt_dir: Any) -> Dict[str, Any]:
    """COCO instances (RLE) of the ground truth's thing segments, for the many-to-one matching."""
    from pathlib import Path

    from cutler.structures.rle import encode_masks

    from .panoptic import read_panoptic_png

    isthing = {int(c["id"]): bool(c.get("isthing", 0)) for c in gt["categories"]}
    anns = []
    for a in gt["annotations"]:
        things = [s for s in a["segments_info"] if isthing[int(s["category_id"])]]
        if not things:
            continue
        ids = read_panoptic_png(Path(gt_dir) / a["file_name"])
        for s, rle in zip(things, encode_masks(np.stack([ids == s["id"] for s in things]))):
            x, y, w, h = s.get("bbox") or [0, 0, 0, 0]
            anns.append({"id": len(anns) + 1, "image_id": a["image_id"], "category_id": int(s["category_id"]),
                         "iscrowd": int(s.get("iscrowd", 0)), "segmentation": rle, "area": float((ids == s["id"]).sum()),
                         "bbox": [x, y, w, h]})
    cats = [c for c in gt["categories"] if c.get("isthing", 0)]
    return {"images": gt["images"], "annotations": anns, "categories": cats}


def evaluate_panoptic(pred_dir: Any, gt_json: Any, gt_dir: Any, num_things: int, conf: float = 0.4, iou: float = 0.6,
                      match_iou_type: str = "segm") -> Dict[str, Any]:
    """PQ / SQ / RQ of cluster-level predictions (:func:`predict_panoptic`) after matching clusters to categories.

    Thing clusters map many-to-one by instance votes (:func:`cutler.u2seg.matching.match_clusters` with
    ``conf``, ``iou``, ``match_iou_type``; published COCO, 800 clusters: 0.4 / 0.6), stuff clusters one-to-one by
    pixel overlap with the ground-truth stuff categories (Hungarian). Unmatched clusters' segments become void.

    Returns:
        ``{"PQ", "SQ", "RQ", "PQ_th", ..., "RQ_st"}`` in percent, plus ``"per_category"``, ``"thing_mapping"``,
        ``"stuff_mapping"`` and ``"images"``.
    """
    import json
    from pathlib import Path

    from cutler.maskcut.writer import read_failures

    from .matching import match_clusters
    from .panoptic import load_panoptic_json, read_panoptic_png

    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    gt = load_panoptic_json(gt_json)
    records = {r["image_id"]: r for r in read_failures(pred_dir / "records.jsonl")}
    missing = [a["image_id"] for a in gt["annotations"] if a["image_id"] not in records]
    if missing:
        raise ValueError(f"{pred_dir}: no prediction for {len(missing)} ground-truth images (e.g. {missing[:3]}); "
                         "run the inference to the end first")
    results = [json.loads(line) for line in (pred_dir / "instances.jsonl").read_text().splitlines() if line.strip()]
    things = match_clusters(_gt_instances(gt, gt_dir), results, conf, iou, match_iou_type) if results else None
    thing_map = dict(things.mapping) if things else {}
    isthing = {int(c["id"]): bool(c.get("isthing", 0)) for c in gt["categories"]}
    stuff_cats = sorted(c for c, t in isthing.items() if not t)
    stuff_index = {c: i for i, c in enumerate(stuff_cats)}
    loaded = []
    pred_stuff = set()
    for a in gt["annotations"]:
        r = records[a["image_id"]]
        gt_ids, pred_ids = read_panoptic_png(gt_dir / a["file_name"]), read_panoptic_png(pred_dir / "panoptic" / r["file_name"])
        loaded.append((a, r, gt_ids, pred_ids))
        pred_stuff.update(int(s["category_id"]) for s in r["segments_info"] if not s["isthing"])
    pred_stuff_list = sorted(pred_stuff)
    confusion = np.zeros((len(pred_stuff_list), len(stuff_cats)), np.int64)
    row_of = {c: i for i, c in enumerate(pred_stuff_list)}
    for a, r, gt_ids, pred_ids in loaded:
        g = np.full(gt_ids.shape, -1, np.int64)
        for s in a["segments_info"]:
            if not isthing[int(s["category_id"])] and not s.get("iscrowd", 0):
                g[gt_ids == s["id"]] = stuff_index[int(s["category_id"])]
        pr = np.full(pred_ids.shape, -1, np.int64)
        for s in r["segments_info"]:
            if not s["isthing"]:
                pr[pred_ids == s["id"]] = row_of[int(s["category_id"])]
        confusion += confusion_matrix(pr, g, len(pred_stuff_list), len(stuff_cats), ignore=None)
    stuff_map = {pred_stuff_list[r]: stuff_cats[c] for r, c in hungarian_match(confusion).items()} if confusion.size else {}
    pq = PanopticQuality(gt["categories"])
    for a, r, gt_ids, pred_ids in loaded:
        mapping = {**{c: thing_map.get(c) for c in range(1, num_things + 1)}, **stuff_map}
        ids, segs = relabel_segments(pred_ids, r["segments_info"], mapping)
        pq.update(gt_ids, a["segments_info"], ids, segs)
    out: Dict[str, Any] = pq_summary(pq.compute())
    out.update({"per_category": {str(k): v for k, v in pq.per_category().items()}, "images": len(loaded),
                "thing_mapping": {str(k): v for k, v in thing_map.items()},
                "stuff_mapping": {str(k): v for k, v in stuff_map.items()}})
    return out


def semantic_label_metrics(pairs: Iterable[Tuple[np.ndarray, np.ndarray]], num_labels: int) -> Dict[str, Any]:
    """PixelAcc / mIoU of ``(predicted label map, ground-truth class map)`` pairs after the one-to-one Hungarian
    matching. Predicted labels lie in ``1..num_labels`` (0 = unlabeled, always an error); ground truth in
    ``0..K-1`` with 255 = void (ignored)."""
    pairs = list(pairs)
    valid = [g[g != 255] for _, g in pairs]
    num_gt = max((int(v.max()) + 1 for v in valid if v.size), default=0)
    confusion = sum(confusion_matrix(p, g, num_labels + 1, num_gt) for p, g in pairs)
    confusion[0] = 0  # unlabeled predicted pixels count as errors, never as a class
    return hungarian_semantic_metrics(confusion)


def semantic_from_predictions(pred_dir: Any, gt: Mapping[str, Any], semantic_dir: Any, num_labels: int) -> Dict[str, Any]:
    """:func:`semantic_label_metrics` of panoptic predictions (:func:`predict_panoptic`) read as semantic maps (each
    pixel: its segment's cluster-level category, void = 0) against ``semantic_dir/<stem>.png``."""
    from pathlib import Path

    from cutler.maskcut.writer import read_failures

    from .panoptic import read_label_png, read_panoptic_png

    records = {r["image_id"]: r for r in read_failures(Path(pred_dir) / "records.jsonl")}

    def pairs():
        for im in gt["images"]:
            r = records[im["id"]]
            ids = read_panoptic_png(Path(pred_dir) / "panoptic" / r["file_name"])
            sem = np.zeros(ids.shape, np.int64)
            for s in r["segments_info"]:
                sem[ids == s["id"]] = int(s["category_id"])
            yield sem, read_label_png(Path(semantic_dir) / f"{os.path.splitext(im['file_name'])[0]}.png")

    return semantic_label_metrics(pairs(), num_labels)


def panoptic_report(ours: Mapping[str, float], benchmark: str, label: str = "ours") -> str:
    """A Markdown table: the published rows of ``benchmark`` ("coco" or "cityscapes") and ours."""
    lines = [f"| {benchmark} panoptic | PQ | SQ | RQ |", "|---|---:|---:|---:|"]
    for (bench, row), (pq_, sq, rq) in PUBLISHED_PANOPTIC.items():
        if bench == benchmark:
            lines.append(f"| {row} (published) | {pq_:.1f} | {sq:.1f} | {rq:.1f} |")
    lines.append(f"| {label} | {ours['PQ']:.1f} | {ours['SQ']:.1f} | {ours['RQ']:.1f} |")
    return "\n".join(lines) + "\n"


__all__ = ["PUBLISHED_PANOPTIC", "PUBLISHED_SEMANTIC", "PanopticQuality", "confusion_matrix", "evaluate_panoptic",
           "hungarian_match", "hungarian_semantic_metrics", "panoptic_report", "pq_summary", "predict_panoptic",
           "relabel_segments", "semantic_from_predictions", "semantic_label_metrics"]
