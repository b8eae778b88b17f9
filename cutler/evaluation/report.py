"""Evaluation reports: a printed table plus JSON, Markdown and CSV files with the same numbers."""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..utils.io import atomic_write_json, atomic_write_text
from .coco_eval import METRIC_NAMES


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: numbers with ``digits`` decimals, ``nan``/``None`` as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 1) -> str:
    """A fixed-width text table for the console."""
    cells = [[str(h) for h in header]] + [[fmt(v, digits) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 1) -> str:
    """A GitHub-flavoured Markdown table (first column left-aligned, the rest right-aligned)."""
    out = ["| " + " | ".join(str(h) for h in header) + " |",
           "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(fmt(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(out)


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """CSV with full-precision numbers (``nan`` written as an empty cell)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])
    return buf.getvalue()


def json_safe(obj: Any) -> Any:
    """``nan``/``inf`` -> ``None`` recursively (strict JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def metrics_rows(metrics: Mapping[str, Mapping[str, float]]) -> tuple[List[str], List[List[Any]]]:
    """``{iou_type: {metric: value}}`` -> (header, one row per IoU type) with :data:`METRIC_NAMES` columns."""
    header = ["type"] + list(METRIC_NAMES)
    rows = [[iou_type] + [float(m.get(k, math.nan)) for k in METRIC_NAMES] for iou_type, m in metrics.items()]
    return header, rows


def write_tables(out_dir: os.PathLike | str, stem: str, header: Sequence[str], rows: Sequence[Sequence[Any]],
                 payload: Any, title: str = "", digits: int = 1) -> Dict[str, Path]:
    """Write ``stem.json`` (``payload``), ``stem.md`` and ``stem.csv`` (the table) atomically.

    Returns:
        ``{"json": path, "md": path, "csv": path}``.
    """
    out_dir = Path(out_dir)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "csv": out_dir / f"{stem}.csv"}
    atomic_write_json(paths["json"], json_safe(payload), indent=2)
    md = (f"## {title}\n\n" if title else "") + markdown_table(header, rows, digits) + "\n"
    atomic_write_text(paths["md"], md)
    atomic_write_text(paths["csv"], csv_text(header, rows))
    return paths


def write_metrics_report(out_dir: os.PathLike | str, name: str, metrics: Mapping[str, Mapping[str, float]],
                         extra: Optional[Mapping[str, Any]] = None) -> str:
    """Write ``metrics_<name>.{json,md,csv}`` under ``out_dir`` and return the text table.

    Args:
        out_dir: folder (created).
        name: dataset name (also the title).
        metrics: ``{iou_type: {metric: value in %}}`` as :func:`~cutler.evaluation.coco_eval.evaluate_coco` returns.
        extra: more fields for the JSON file (e.g. number of images, failures, the results file).
    """
    header, rows = metrics_rows(metrics)
    payload = {"dataset": name, "metrics": metrics}
    if extra:
        payload.update(extra)
    write_tables(out_dir, f"metrics_{name}", header, rows, payload, title=f"{name} (class-agnostic, %)")
    return f"{name} (class-agnostic, %)\n" + text_table(header, rows)
