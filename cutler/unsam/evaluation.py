"""UnSAM's evaluation: class-agnostic mask AR with up to 1000 detections (and AR small / medium / large) of a
whole-image segmenter on COCO, LVIS and SA-1B-format data, and of the pseudo-masks alone; each reported next
to the published rows of the UnSAM paper.

Published figures (UnSAM paper, zero-shot, mask AR in %, up to 1000 detections per image; restated):

* whole-image segmenters: :data:`PUBLISHED_SEGMENTER_AR` (CutLER, SOHES, UnSAM trained on 0.1M images, and
  the supervised SAM for context);
* pseudo-masks alone on 1000 held-out SA-1B images: :data:`PUBLISHED_PSEUDO_AR` (SOHES and UnSAM, each with a
  dense CRF or CascadePSP refinement; ours uses the dense CRF).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..utils.logging import get_logger

logger = get_logger(__name__)

#: (label, catalog names, preferred first) of the benchmarks with published UnSAM rows that we can evaluate.
BENCHMARKS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("COCO", ("coco_2017_val",)),
    ("LVIS", ("lvis_val",)),
    ("SA-1B", ("sa1b_val",)),
)
#: Published mask AR (%) of whole-image models, zero-shot, up to 1000 detections.
PUBLISHED_SEGMENTER_AR: Dict[str, Dict[str, float]] = {
    "CutLER (paper)": {"COCO": 28.1, "LVIS": 20.2, "SA-1B": 17.0},
    "SOHES (paper)": {"COCO": 30.5, "LVIS": 29.1, "SA-1B": 33.3},
    "UnSAM, 0.1M images (paper)": {"COCO": 40.5, "LVIS": 37.7, "SA-1B": 41.9},
    "SAM, supervised (paper)": {"COCO": 49.6, "LVIS": 46.1, "SA-1B": 60.8},
}
#: Published AR of pseudo-masks alone on SA-1B: (AR1000, ARs, ARm, ARl), %.
PUBLISHED_PSEUDO_AR: Dict[str, Tuple[float, float, float, float]] = {
    "SOHES, CRF (paper)": (12.0, 3.5, 9.5, 20.7),
    "SOHES, CascadePSP (paper)": (16.4, 6.0, 15.8, 22.6),
    "UnSAM, CRF (paper)": (15.3, 2.3, 11.9, 27.7),
    "UnSAM, CascadePSP (paper)": (23.9, 7.9, 22.4, 34.0),
}
AR_KEYS = ("AR", "ARs", "ARm", "ARl")


def ar_summary(metrics: Mapping[str, Mapping[str, float]], iou_type: str = "segm") -> Dict[str, float]:
    """``{"AR", "ARs", "ARm", "ARl"}`` of one IoU type from :func:`cutler.evaluation.coco_eval.evaluate_coco`
    output, all at its ``max_dets`` (its ``AR100`` entry is the AR at the largest ``maxDets``)."""
    m = metrics.get(iou_type, {})
    return {"AR": m.get("AR100", math.nan), "ARs": m.get("ARs", math.nan), "ARm": m.get("ARm", math.nan),
            "ARl": m.get("ARl", math.nan)}


def segmenter_table(per_benchmark: Mapping[str, Mapping[str, float]], max_dets: int = 1000
                    ) -> Tuple[List[str], List[List[Any]]]:
    """Header and rows: ``ours`` (AR per benchmark, ``-`` where not evaluated), then the published rows.

    Args:
        per_benchmark: ``{label: ar_summary(...)}`` for the evaluated benchmarks of :data:`BENCHMARKS`.
    """
    labels = [label for label, _ in BENCHMARKS]
    header = ["method"] + [f"{label} AR{max_dets}" for label in labels]
    rows: List[List[Any]] = [["ours"] + [per_benchmark.get(label, {}).get("AR", math.nan) for label in labels]]
    rows += [[name] + [values.get(label, math.nan) for label in labels] for name, values in PUBLISHED_SEGMENTER_AR.items()]
    return header, rows


def pseudo_table(ours: Optional[Mapping[str, float]], max_dets: int = 1000, ours_label: str = "ours"
                 ) -> Tuple[List[str], List[List[Any]]]:
    """Header and rows of pseudo-mask AR: ours (``ar_summary`` output, or None) then the published SA-1B rows."""
    header = ["pseudo-masks", f"AR{max_dets}", "ARs", "ARm", "ARl"]
    rows: List[List[Any]] = []
    if ours is not None:
        rows.append([ours_label] + [ours.get(k, math.nan) for k in AR_KEYS])
    rows += [[name, *values] for name, values in PUBLISHED_PSEUDO_AR.items()]
    return header, rows


def evaluate_pseudo_masks(pred: Any, gt: Any, max_dets: int = 1000) -> Dict[str, Any]:
    """Class-agnostic metrics of pseudo-masks (a COCO annotation JSON) against ground truth.

    Every pseudo-mask is a detection of score 1 (unranked: up to ``max_dets`` per image in file order, divide
    masks first); images are matched by file name. Returns :func:`cutler.evaluation.pseudo_labels.
    evaluate_pseudo_labels` output without its results list, plus ``"ar": ar_summary(segm)``.
    """
    from ..evaluation.pseudo_labels import evaluate_pseudo_labels

    out = evaluate_pseudo_labels(pred, gt, score_mode="constant", max_dets=max_dets)
    out.pop("results", None)
    out["ar"] = ar_summary(out["metrics"], "segm" if "segm" in out["metrics"] else "bbox")
    return out


def evaluate_segmenter(model: Any, cfg: Any, datasets: Optional[Sequence[str]] = None,
                       output_dir: Optional[os.PathLike | str] = None, root: Optional[os.PathLike | str] = None,
                       printer: Callable[[str], None] = print) -> Dict[str, Any]:
    """AR of a whole-image segmenter on the available benchmarks, next to the published rows.

    Args:
        model: the segmenter (detector interface), eval mode.
        cfg: its config; ``unsam.max_dets`` detections per image are kept (``test.detections_per_image`` should
            allow as many) and ``eval.max_dets`` is set to it.
        datasets: catalog names or benchmark labels; default all of :data:`BENCHMARKS` (plus any other catalog
            name given, reported as an extra column-less row in the JSON).
        output_dir: default ``<cfg.output_dir>/unsam_eval``; per-dataset results in ``<output_dir>/<name>``.
        root: datasets root (default ``cfg.datasets.root``).

    Returns:
        ``{"metrics": {name: {iou_type: {...}}}, "ar": {label: ar_summary}, "skipped": {label: reason},
        "table": str}``; the table is also written to ``output_dir/unsam_ar.{json,md,csv}``.
    """
    from omegaconf import OmegaConf

    from ..evaluation.evaluator import DatasetMissingError, evaluate_dataset, resolve_available
    from ..evaluation.report import text_table, write_tables

    max_dets = int(cfg.unsam.max_dets)
    ecfg = OmegaConf.merge(cfg, {"eval": {"max_dets": max_dets}})
    root = root if root is not None else cfg.datasets.root
    out = Path(output_dir) if output_dir is not None else Path(cfg.output_dir) / "unsam_eval"
    wanted = list(datasets) if datasets else [label for label, _ in BENCHMARKS]
    plan: List[Tuple[str, str]] = []
    skipped: Dict[str, str] = {}
    for item in wanted:
        bench = next(((label, names) for label, names in BENCHMARKS if item in (label, *names)), None)
        label, names = bench if bench else (item, (item,))
        reasons = []
        for name in names:
            try:
                resolve_available(name, root)
                plan.append((label, name))
                break
            except DatasetMissingError as e:
                reasons.append(str(e))
        else:
            skipped[label] = "; ".join(reasons)
            printer(f"[skip] {label}: {skipped[label]}")
    metrics, ars = {}, {}
    for label, name in plan:
        printer(f"[eval] {label}: {name}")
        m = evaluate_dataset(model, ecfg, name, output_dir=out / name, root=root)
        if m:
            metrics[name] = m
            ars[label] = ar_summary(m, "segm" if "segm" in m else "bbox")
    header, rows = segmenter_table(ars, max_dets)
    table = f"Class-agnostic mask AR (%), up to {max_dets} detections, ours vs published\n" + text_table(header, rows)
    extra = {k: v for k, v in ars.items() if k not in dict(BENCHMARKS)}
    if extra:
        table += "\n\nOther datasets:\n" + text_table(["dataset", *AR_KEYS], [[k, *[v[a] for a in AR_KEYS]]
                                                                          for k, v in extra.items()])
    write_tables(out, "unsam_ar", header, rows, {"metrics": metrics, "ar": ars, "skipped": skipped},
                 title=f"Mask AR{max_dets}")
    printer(table)
    return {"metrics": metrics, "ar": ars, "skipped": skipped, "table": table}
