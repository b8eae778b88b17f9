"""U2Seg's evaluation: class-aware inference, many-to-one matching, matched and class-agnostic COCO metrics,
and the published table rows (COCO val2017, VOC, UVO) beside ours.

Per dataset, into ``<output_dir>/<dataset>/``: the detections (cluster ids as categories), the mapping
used (``cluster_mapping.json``: thresholds, the category of each cluster and its vote histogram),
``per_category.{md,csv}`` (matched AP / AP50 / AR100 per dataset category) and ``metrics.json``; over all
datasets ``u2seg_eval.{json,md,csv}`` (ours next to CutLER+ and U2Seg, as published).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from cutler.evaluation.coco_eval import gt_has_masks, load_json
from cutler.evaluation.evaluator import _cfg_get, _infer, _resolve
from cutler.evaluation.report import text_table, write_tables
from cutler.evaluation.zero_shot import find_dataset
from cutler.utils.io import atomic_write_json
from cutler.utils.logging import get_logger

from .matching import evaluate_matched

logger = get_logger(__name__)

PUBLISHED_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")  # the thesis' full rows


@dataclass(frozen=True)
class Benchmark:
    """One dataset of U2Seg's tables: its label and the class-aware catalog names that hold it."""

    label: str
    datasets: Tuple[str, ...]


BENCHMARKS: Tuple[Benchmark, ...] = (
    Benchmark("COCO", ("coco_2017_val",)),
    Benchmark("VOC", ("voc12_val_classes",)),
    Benchmark("UVO", ("uvo_val_classes",)),
)

#: The published matching thresholds ``(IoU, conf)`` per benchmark and cluster count.
MATCH_PARAMS: Dict[Tuple[str, int], Tuple[float, float]] = {
    ("COCO", 300): (0.6, 0.3), ("COCO", 800): (0.6, 0.4), ("COCO", 2911): (0.5, 0.3),
    ("VOC", 300): (0.8, 0.4), ("VOC", 800): (0.8, 0.2), ("VOC", 2911): (0.5, 0.2),
    ("UVO", 300): (0.7, 0.1), ("UVO", 800): (0.4, 0.1), ("UVO", 2911): (0.6, 0.1),
}
DEFAULT_MATCH = MATCH_PARAMS[("COCO", 800)]


def _row(values: Sequence[float]) -> Dict[str, float]:
    return dict(zip(PUBLISHED_METRICS, values))


#: U2Seg's published results (trained on ImageNet, zero-shot, matched), in %: {(benchmark, C): {iou_type: {...}}}.
U2SEG_PUBLISHED: Dict[Tuple[str, int], Dict[str, Dict[str, float]]] = {
    ("COCO", 300): {"bbox": _row([5.7, 9.3, 5.9, 0.5, 4.6, 12.9, 11.9, 19.5, 20.1]),
                    "segm": _row([4.9, 8.6, 5.0, 0.3, 2.6, 11.8, 10.7, 16.9, 17.3])},
    ("COCO", 800): {"bbox": _row([7.3, 11.8, 7.5, 1.2, 5.8, 15.8, 13.3, 20.8, 21.5]),
                    "segm": _row([6.4, 11.2, 6.4, 0.7, 3.7, 15.0, 11.9, 18.0, 18.5])},
    ("COCO", 2911): {"bbox": _row([8.2, 13.3, 8.4, 1.4, 7.0, 18.2, 14.1, 21.4, 22.1]),
                     "segm": _row([7.3, 12.4, 7.4, 0.8, 4.9, 17.9, 12.8, 18.7, 19.2])},
    ("VOC", 300): {"bbox": _row([18.4, 29.6, 18.8, 0.3, 3.8, 26.0, 27.1, 41.0, 42.8])},
    ("VOC", 800): {"bbox": _row([19.0, 31.0, 19.5, 0.6, 4.8, 26.6, 28.8, 45.2, 48.1])},
    ("VOC", 2911): {"bbox": _row([19.2, 31.6, 19.7, 1.0, 6.4, 26.6, 28.6, 44.9, 48.3])},
    ("UVO", 300): {"bbox": _row([6.5, 9.8, 6.5, 0.8, 2.6, 9.2, 16.0, 22.2, 22.6]),
                   "segm": _row([6.1, 9.5, 5.8, 0.7, 1.0, 8.8, 14.1, 19.2, 19.4])},
    ("UVO", 800): {"bbox": _row([6.8, 10.8, 7.2, 0.6, 2.9, 10.2, 17.2, 24.5, 25.0]),
                   "segm": _row([6.2, 9.5, 6.0, 0.5, 2.1, 9.8, 15.7, 20.6, 21.0])},
    ("UVO", 2911): {"bbox": _row([9.7, 15.1, 9.3, 0.6, 5.2, 14.4, 18.0, 25.3, 25.8]),
                    "segm": _row([8.8, 13.9, 8.4, 0.5, 6.4, 14.4, 16.0, 21.7, 22.1])},
}
#: CutLER+ (CutLER's class-agnostic detector + offline clustering of its detections into 800 clusters).
CUTLER_PLUS_PUBLISHED: Dict[str, Dict[str, Dict[str, float]]] = {
    "COCO": {"bbox": {"AP": 5.9, "AP50": 9.0, "AP75": 6.1, "AR100": 10.3},
             "segm": {"AP": 5.3, "AP50": 8.6, "AP75": 5.5, "AR100": 9.3}},
    "VOC": {"bbox": {"AP": 17.1, "AP50": 26.8, "AP75": 18.1, "AR100": 27.2}},
    "UVO": {"bbox": {"AP": 6.3, "AP50": 10.6, "AR100": 11.8}, "segm": {"AP": 6.0, "AP50": 9.0, "AR100": 10.4}},
}
#: Class-agnostic COCO val2017 box AP50 / AP: CutLER and U2Seg (800 clusters).
AGNOSTIC_PUBLISHED = {"CutLER": {"AP50": 21.9, "AP": 12.3}, "U2Seg": {"AP50": 22.8, "AP": 13.0}}
TABLE_METRICS = ("AP", "AP50", "AP75", "AR100")


def published_clusters(num_clusters: int) -> Optional[int]:
    """``num_clusters`` if U2Seg published that setting (300, 800, 2911), else None."""
    return num_clusters if any(c == num_clusters for _, c in MATCH_PARAMS) else None


def match_params(cfg: Any, label: Optional[str], num_clusters: int) -> Tuple[float, float]:
    """``(iou, conf)`` of the matching: ``u2seg.match_iou`` / ``match_conf`` when >= 0, else the published pair
    for (benchmark, cluster count), else COCO 800's (0.6, 0.4)."""
    iou, conf = MATCH_PARAMS.get((label or "", int(num_clusters)), DEFAULT_MATCH)
    cfg_iou = float(_cfg_get(cfg, "u2seg.match_iou", -1.0))
    cfg_conf = float(_cfg_get(cfg, "u2seg.match_conf", -1.0))
    return (cfg_iou if cfg_iou >= 0 else iou), (cfg_conf if cfg_conf >= 0 else conf)


def benchmark_label(dataset_name: str) -> Optional[str]:
    """The U2Seg benchmark a catalog name belongs to (None for other datasets)."""
    return next((b.label for b in BENCHMARKS if dataset_name in b.datasets), None)


def evaluate_results(gt_json: os.PathLike | str | Mapping[str, Any], results: Any, out_dir: os.PathLike | str,
                     conf: float, iou: float, match_iou_type: str = "bbox",
                     iou_types: Sequence[str] = ("bbox",), max_dets: int = 100, name: str = "") -> Dict[str, Any]:
    """Matched and class-agnostic metrics of detections named by cluster id; writes the mapping and tables.

    Returns:
        ``{"bbox": agnostic, "segm": ..., "matched_bbox": matched, "matched_segm": ...}`` (metrics in %;
        ``metrics.json`` also records the matching's thresholds and counts).
    """
    gt = load_json(gt_json)
    names = {c["id"]: c.get("name", str(c["id"])) for c in gt.get("categories", [])}
    res = evaluate_matched(gt, results, conf, iou, match_iou_type, iou_types, max_dets)
    out_dir = Path(out_dir)
    mapping = res["mapping"].as_json(names)
    atomic_write_json(out_dir / "cluster_mapping.json", {"dataset": name, **mapping}, indent=1)
    header = ["category", "id", "clusters"] + [f"{t} {k}" for t in iou_types for k in ("AP", "AP50", "AR100")]
    clusters_per_cat: Dict[int, int] = {}
    for cat in res["mapping"].mapping.values():
        clusters_per_cat[cat] = clusters_per_cat.get(cat, 0) + 1
    rows = [[names.get(cid, str(cid)), cid, clusters_per_cat.get(cid, 0)] +
            [res["per_category"][t].get(cid, {}).get(k, math.nan) for t in iou_types for k in ("AP", "AP50", "AR100")]
            for cid in sorted(names)]
    write_tables(out_dir, "per_category", header, rows, {"dataset": name, "per_category": res["per_category"]},
                 title=f"{name}: matched metrics per category (%)")
    metrics: Dict[str, Any] = {}
    for t in iou_types:
        metrics[t] = res["agnostic"][t]
        metrics[f"matched_{t}"] = res["matched"][t]
    summary = {k: v for k, v in mapping.items() if k != "clusters"}
    atomic_write_json(out_dir / "metrics.json", {"dataset": name, **metrics, "matching": summary}, indent=1)
    logger.info("%s: matched %d clusters to %d categories (IoU > %.2f on %s, conf >= %.2f); matched box AP %.1f, "
                "class-agnostic box AP %.1f", name, summary["matched_clusters"], summary["categories_covered"], iou,
                match_iou_type, conf, res["matched"]["bbox"]["AP"] if "bbox" in res["matched"] else math.nan,
                res["agnostic"]["bbox"]["AP"] if "bbox" in res["agnostic"] else math.nan)
    return metrics


def evaluate_dataset(model: Any, cfg: Any, dataset_name: str, output_dir: Optional[os.PathLike | str] = None,
                     root: Optional[os.PathLike | str] = None, label: Optional[str] = None) -> Dict[str, Any]:
    """Class-aware inference of ``model`` on a catalog dataset with categories, then :func:`evaluate_results`.

    Args:
        cfg: the config (inference settings as :func:`cutler.evaluation.evaluator.evaluate_dataset`;
            ``u2seg.num_clusters``, ``u2seg.match_*``).
        label: the benchmark (for the published matching thresholds); default from the dataset name.

    Returns:
        The metrics (``{}`` on ranks that did not merge the results).
    """
    ds, gt, out = _resolve(cfg, dataset_name, output_dir, root)
    mask_on = bool(_cfg_get(cfg, "model.mask_on", False)) and not bool(_cfg_get(cfg, "test.no_segm", False))
    iou_types = ("bbox", "segm") if mask_on and ds.has_masks and gt_has_masks(gt) else ("bbox",)
    results = _infer(model, cfg, ds, gt, out, with_masks="segm" in iou_types, class_aware=True)
    if results is None:
        return {}
    label = label or benchmark_label(dataset_name)
    iou, conf = match_params(cfg, label, int(_cfg_get(cfg, "u2seg.num_clusters", 800)))
    match_on = str(_cfg_get(cfg, "u2seg.match_iou_type", "bbox"))
    if match_on == "segm" and "segm" not in iou_types:
        match_on = "bbox"
    return evaluate_results(gt, results, out, conf, iou, match_on, iou_types,
                            int(_cfg_get(cfg, "eval.max_dets", 100)), dataset_name)


def u2seg_table(per: Mapping[str, Mapping[str, Any]], num_clusters: int) -> Tuple[List[str], List[List[Any]]]:
    """Rows ``benchmark | metric | ours | CutLER+ (paper) | U2Seg-C (paper)`` for the matched metrics, then the
    class-agnostic COCO rows (ours | CutLER | U2Seg)."""
    c = published_clusters(num_clusters)
    header = ["benchmark", "metric", f"ours ({num_clusters} clusters)", "CutLER+ (paper)",
              f"U2Seg-{c or 800} (paper)"]
    rows: List[List[Any]] = []
    labels = [b.label for b in BENCHMARKS] + [k for k in per if k not in {b.label for b in BENCHMARKS}]
    for label in labels:
        ours = per.get(label, {})
        paper = U2SEG_PUBLISHED.get((label, c or 800), {})
        for t, name in (("bbox", "box"), ("segm", "mask")):
            if t not in paper and f"matched_{t}" not in ours:
                continue
            for k in TABLE_METRICS:
                rows.append([label, f"{name} {k}", ours.get(f"matched_{t}", {}).get(k, math.nan),
                             CUTLER_PLUS_PUBLISHED.get(label, {}).get(t, {}).get(k, math.nan),
                             paper.get(t, {}).get(k, math.nan)])
    coco = per.get("COCO", {}).get("bbox", {})
    for k in ("AP50", "AP"):
        rows.append(["COCO class-agnostic", f"box {k}", coco.get(k, math.nan), AGNOSTIC_PUBLISHED["CutLER"][k],
                     AGNOSTIC_PUBLISHED["U2Seg"][k]])
    return header, rows


def run_u2seg_eval(model: Any, cfg: Any, datasets: Optional[Sequence[str]] = None,
                   output_dir: Optional[os.PathLike | str] = None, root: Optional[os.PathLike | str] = None,
                   printer: Callable[..., None] = print) -> Dict[str, Any]:
    """Evaluate ``model`` on U2Seg's benchmarks that are on disk (or on ``datasets``: benchmark labels or catalog
    names with categories) and print / write the table beside the published rows.

    Returns:
        ``{"metrics": {label or name: metrics}, "skipped": {label: reason}, "table": str}``.
    """
    root = root if root is not None else _cfg_get(cfg, "datasets.root", None)
    out = Path(output_dir) if output_dir is not None else Path(_cfg_get(cfg, "output_dir", "output")) / "u2seg_eval"
    wanted = [d.lower() for d in datasets] if datasets else [b.label.lower() for b in BENCHMARKS]
    plan: List[Tuple[str, str]] = []
    skipped: Dict[str, str] = {}
    for b in BENCHMARKS:
        if b.label.lower() in wanted or set(wanted) & set(b.datasets):
            name, reason = find_dataset(b, root)
            if name is None:
                skipped[b.label] = reason
            else:
                plan.append((b.label, name))
    known = {b.label.lower() for b in BENCHMARKS} | {d for b in BENCHMARKS for d in b.datasets}
    for name in datasets or []:
        if name.lower() not in known:  # any other catalog dataset with categories (e.g. synthetic_shapes_val)
            plan.append((name, name))
    for label, reason in skipped.items():
        printer(f"[skip] {label}: {reason}")
    per: Dict[str, Dict[str, Any]] = {}
    for label, name in plan:
        printer(f"[eval] {label}: {name}")
        metrics = evaluate_dataset(model, cfg, name, out / name, root, label)
        if metrics:
            per[label] = {"dataset": name, **metrics}
    num_clusters = int(_cfg_get(cfg, "u2seg.num_clusters", 800))
    header, rows = u2seg_table(per, num_clusters)
    table = "U2Seg zero-shot, matched cluster ids (%): ours vs published\n" + text_table(header, rows)
    if per or skipped:
        write_tables(out, "u2seg_eval", header, rows, {"metrics": per, "skipped": skipped}, title="U2Seg evaluation")
    printer(table)
    return {"metrics": per, "skipped": skipped, "table": table}
