"""The zero-shot table of the paper: 11 benchmarks, AP50/AR100 (box), the average, and the full COCO row."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..data.catalog import get_dataset
from ..utils.logging import get_logger
from .evaluator import DatasetMissingError, _cfg_get, evaluate_corloc_dataset, evaluate_dataset, resolve_available
from .report import text_table, write_tables

logger = get_logger(__name__)


@dataclass(frozen=True)
class Benchmark:
    """One column of the paper's zero-shot table."""

    label: str
    datasets: Tuple[str, ...]  # catalog names, preferred first (the first one on disk is used)
    paper_ap50: float  # published CutLER (Cascade, after self-training) AP50 box, %
    paper_ar100: float  # AR100 box, %
    note: str = ""


BENCHMARKS: Tuple[Benchmark, ...] = (
    Benchmark("COCO", ("coco_2017_val",), 21.9, 32.7),
    Benchmark("COCO20K", ("coco20k",), 22.4, 33.1),
    Benchmark("VOC", ("voc07_trainvaltest", "voc07_trainval"), 36.9, 44.3,
              "paper: VOC2007 trainval+test, 9,963 images"),
    Benchmark("LVIS", ("lvis_val",), 8.4, 21.8),
    Benchmark("UVO", ("uvo_val",), 31.7, 42.8),
    Benchmark("Clipart", ("clipart",), 21.1, 41.3),
    Benchmark("Comic", ("comic",), 30.4, 38.6),
    Benchmark("Watercolor", ("watercolor",), 37.5, 44.6),
    Benchmark("KITTI", ("kitti_trainval",), 18.4, 27.5),
    Benchmark("Objects365", ("objects365_val",), 21.6, 34.2),
    Benchmark("OpenImages", ("openimages_val",), 17.3, 29.6),
)
PAPER_AVERAGE = (24.3, 35.5)
#: COCO val2017 full row of the paper: box AP50/AP75/AP, mask AP50/AP75/AP.
PAPER_COCO_ROW = {"box": {"AP50": 21.9, "AP75": 11.8, "AP": 12.3}, "mask": {"AP50": 18.9, "AP75": 9.2, "AP": 9.7}}
#: MaskCut pseudo-masks alone on COCO val2017 (for eval_pseudo_labels).
PAPER_MASKCUT_COCO = {"box": {"AP50": 6.0, "AP": 2.9}, "mask": {"AP50": 4.9, "AP": 2.2}}


def select_benchmarks(names: Optional[Sequence[str]] = None) -> List[Benchmark]:
    """The benchmarks named by catalog names or labels (case-insensitive), in the paper's order.

    Raises:
        KeyError: a name that is neither a benchmark label nor one of their dataset names.
    """
    if not names:
        return list(BENCHMARKS)
    wanted = {n.lower() for n in names}
    known = {b.label.lower() for b in BENCHMARKS} | {d for b in BENCHMARKS for d in b.datasets}
    unknown = sorted(wanted - known)
    if unknown:
        raise KeyError(f"not zero-shot benchmarks: {unknown}; choose from {[b.label for b in BENCHMARKS]} "
                       f"or their dataset names {[d for b in BENCHMARKS for d in b.datasets]}")
    return [b for b in BENCHMARKS if b.label.lower() in wanted or wanted & set(b.datasets)]


def find_dataset(bench: Benchmark, root: Optional[os.PathLike | str]) -> Tuple[Optional[str], str]:
    """``(dataset name, "")`` for the first of ``bench.datasets`` on disk, else ``(None, reason)``."""
    reasons = []
    for name in bench.datasets:
        try:
            resolve_available(name, root)
            return name, ""
        except DatasetMissingError as e:
            reasons.append(str(e))
    return None, "; ".join(reasons)


def zero_shot_table(per_benchmark: Mapping[str, Mapping[str, Mapping[str, float]]],
                    benchmarks: Sequence[Benchmark] = BENCHMARKS) -> Tuple[List[str], List[List[Any]]]:
    """Rows ``benchmark | AP50 box | paper | AR100 box | paper`` plus the average row.

    ``per_benchmark``: ``{label: {"bbox": {...}, ...}}`` for the evaluated benchmarks; the others are
    shown with ``-``. The average is over the evaluated benchmarks (marked ``k/11`` when incomplete);
    the paper's average is over all 11.
    """
    header = ["benchmark", "AP50_box", "paper_AP50", "AR100_box", "paper_AR100"]
    rows: List[List[Any]] = []
    ours_ap, ours_ar = [], []
    for b in benchmarks:
        m = per_benchmark.get(b.label, {}).get("bbox")
        ap, ar = (m["AP50"], m["AR100"]) if m else (math.nan, math.nan)
        if m:
            ours_ap.append(ap)
            ours_ar.append(ar)
        rows.append([b.label, ap, b.paper_ap50, ar, b.paper_ar100])
    k = len(ours_ap)
    avg = (sum(ours_ap) / k, sum(ours_ar) / k) if k else (math.nan, math.nan)
    label = "average" if k == len(BENCHMARKS) else f"average ({k}/{len(BENCHMARKS)})"
    rows.append([label, avg[0], PAPER_AVERAGE[0], avg[1], PAPER_AVERAGE[1]])
    return header, rows


def coco_row(metrics: Optional[Mapping[str, Mapping[str, float]]]) -> Tuple[List[str], List[List[Any]]]:
    """The full COCO val2017 row (box AP50/AP75/AP, mask AP50/AP75/AP), ours and the paper's."""
    header = ["COCO val2017", "box AP50", "box AP75", "box AP", "mask AP50", "mask AP75", "mask AP"]
    metrics = metrics or {}

    def pick(t):
        m = metrics.get(t)
        return [m[k] if m else math.nan for k in ("AP50", "AP75", "AP")]

    paper = [PAPER_COCO_ROW[t][k] for t in ("box", "mask") for k in ("AP50", "AP75", "AP")]
    return header, [["ours"] + pick("bbox") + pick("segm"), ["CutLER (paper)"] + paper]


def plan_zero_shot(cfg: Any, datasets: Optional[Sequence[str]] = None, root: Optional[os.PathLike | str] = None
                   ) -> Tuple[List[Tuple[Benchmark, str]], Dict[str, str]]:
    """Which benchmarks can run: ``([(benchmark, dataset name on disk)], {label: why skipped})``.

    ``datasets``: labels or catalog names, default ``cfg.eval.datasets``; ``root`` default ``cfg.datasets.root``.
    """
    root = root if root is not None else _cfg_get(cfg, "datasets.root", None)
    names = list(datasets) if datasets else list(_cfg_get(cfg, "eval.datasets", []))
    plan, skipped = [], {}
    for bench in select_benchmarks(names):
        name, reason = find_dataset(bench, root)
        if name is None:
            skipped[bench.label] = reason
        else:
            plan.append((bench, name))
    return plan, skipped


def run_zero_shot(model: Any, cfg: Any, datasets: Optional[Sequence[str]] = None,
                  output_dir: Optional[os.PathLike | str] = None, root: Optional[os.PathLike | str] = None,
                  printer=print) -> Dict[str, Any]:
    """Evaluate ``model`` on every available zero-shot benchmark and report the paper-style table.

    Args:
        model: detector (eval interface).
        cfg: configuration (see :func:`~cutler.evaluation.evaluator.evaluate_dataset`).
        datasets: benchmark labels or catalog names; default ``cfg.eval.datasets``.
        output_dir: default ``<cfg.output_dir>/zero_shot``; per-dataset results go to ``<output_dir>/<name>``.
        root: datasets root (default ``cfg.datasets.root``).
        printer: where the one-line notes and tables go (rank 0 only).

    Returns:
        ``{"metrics": {label: {"dataset": name, "bbox": {...}, "segm": {...}}}, "skipped": {label: reason},
        "table": str}``; tables are also written to ``output_dir/zero_shot.{json,md,csv}`` and
        ``coco_full_row.{md,csv}``.
    """
    root = root if root is not None else _cfg_get(cfg, "datasets.root", None)
    out = Path(output_dir) if output_dir is not None else Path(_cfg_get(cfg, "output_dir", "output")) / "zero_shot"
    plan, skipped = plan_zero_shot(cfg, datasets, root)
    per: Dict[str, Dict[str, Any]] = {}
    for label, reason in skipped.items():
        printer(f"[skip] {label}: {reason}")
    for bench, name in plan:
        if bench.note and name != bench.datasets[0]:
            printer(f"[note] {bench.label}: using {name} ({get_dataset(name, root).json_file.name}); {bench.note}")
        printer(f"[eval] {bench.label}: {name}")
        metrics = evaluate_dataset(model, cfg, name, output_dir=out / name, root=root)
        if metrics:
            per[bench.label] = {"dataset": name, **metrics}
    header, rows = zero_shot_table(per)
    table = "Zero-shot class-agnostic detection (%), ours vs published CutLER\n" + text_table(header, rows)
    c_header, c_rows = coco_row(per.get("COCO"))
    table += "\n\n" + text_table(c_header, c_rows)
    if per or skipped:
        write_tables(out, "zero_shot", header, rows, {"metrics": per, "skipped": skipped}, title="Zero-shot")
        write_tables(out, "coco_full_row", c_header, c_rows, {"coco": per.get("COCO")}, title="COCO val2017")
    printer(table)
    return {"metrics": per, "skipped": skipped, "table": table}


def run_corloc(model: Any, cfg: Any, datasets: Optional[Sequence[str]] = None,
               output_dir: Optional[os.PathLike | str] = None, root: Optional[os.PathLike | str] = None,
               printer=print) -> Dict[str, Any]:
    """CorLoc (single-object discovery) on the available datasets of ``datasets``.

    Args:
        datasets: catalog names, default ``cfg.eval.corloc_datasets`` (VOC07/VOC12 trainval, COCO20K).
        output_dir: default ``<cfg.output_dir>/zero_shot``; results go to ``<output_dir>/<name>``, the
            folders :func:`run_zero_shot` uses, so predictions made there are reused.

    Returns:
        ``{"corloc": {name: {...}}, "skipped": {name: reason}, "table": str}``; also ``corloc.{json,md,csv}``.
    """
    root = root if root is not None else _cfg_get(cfg, "datasets.root", None)
    names = list(datasets) if datasets else list(_cfg_get(cfg, "eval.corloc_datasets", []))
    out = Path(output_dir) if output_dir is not None else Path(_cfg_get(cfg, "output_dir", "output")) / "zero_shot"
    per: Dict[str, Dict[str, float]] = {}
    skipped: Dict[str, str] = {}
    for name in names:
        try:
            resolve_available(name, root)
        except DatasetMissingError as e:
            skipped[name] = str(e)
            printer(f"[skip] CorLoc {name}: {e}")
            continue
        result = evaluate_corloc_dataset(model, cfg, name, output_dir=out / name, root=root)
        if result:
            per[name] = result
    header = ["dataset", "CorLoc", "images", "correct"]
    rows = [[n, r["corloc"], r["num_images"], r["num_correct"]] for n, r in per.items()]
    if per:
        table = "Single-object discovery, CorLoc (%)\n" + text_table(header, rows)
        write_tables(out, "corloc", header, rows, {"corloc": per, "skipped": skipped}, title="CorLoc")
    else:
        table = f"CorLoc: none of {names} is on disk"
    printer(table)
    return {"corloc": per, "skipped": skipped, "table": table}
