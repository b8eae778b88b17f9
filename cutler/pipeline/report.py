"""The pipeline's closing report: per-round pseudo-label counts and held-out AP, as Markdown and a plot."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

import cv2
import numpy as np

from cutler.utils.io import atomic_write_text
from cutler.utils.visualization import color_palette, save_rgb_png

METRIC_KEYS = ("AP", "AP50", "AP75", "AR100")


def report_rows(rows: Sequence[Dict[str, Any]], datasets: Sequence[str]) -> tuple[List[str], List[List[Any]]]:
    """Table header and rows: round, pseudo-masks, then AP/AP50/AP75/AR100 per dataset and IoU type."""
    header = ["round", "pseudo-masks"]
    columns = []
    for name in datasets:
        iou_types = sorted({t for row in rows for t in row["metrics"].get(name, {})})
        for iou_type in iou_types:
            for key in METRIC_KEYS:
                header.append(f"{name} {iou_type} {key}")
                columns.append((name, iou_type, key))
    table = []
    for row in rows:
        values = [row["round"], row["pseudo_masks"]]
        for name, iou_type, key in columns:
            values.append(row["metrics"].get(name, {}).get(iou_type, {}).get(key, float("nan")))
        table.append(values)
    return header, table


def line_plot(series: Dict[str, List[float]], x: List[int], title: str, size=(640, 400)) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 RGB line chart of ``series`` over integer ``x`` (rounds)."""
    w, h = size
    img = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 60, 20, 40, 50
    values = [v for vs in series.values() for v in vs if np.isfinite(v)]
    vmax = max(values + [1e-6]) * 1.1
    xs = lambda i: left + (i - min(x)) / max(max(x) - min(x), 1) * (w - left - right)  # noqa: E731
    ys = lambda v: h - bottom - v / vmax * (h - top - bottom)  # noqa: E731
    cv2.line(img, (left, h - bottom), (w - right, h - bottom), (0, 0, 0), 1)
    cv2.line(img, (left, top), (left, h - bottom), (0, 0, 0), 1)
    for k in range(5):
        v = vmax * k / 4
        cv2.putText(img, f"{v:.1f}", (5, int(ys(v)) + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (80, 80, 80), 1, cv2.LINE_AA)
    for i in x:
        cv2.putText(img, f"r{i}", (int(xs(i)) - 8, h - bottom + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    cv2.putText(img, title, (left, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    colors = color_palette(max(len(series), 1))
    for idx, (name, vs) in enumerate(series.items()):
        color = tuple(int(c) for c in colors[idx])
        pts = [(int(xs(i)), int(ys(v))) for i, v in zip(x, vs) if np.isfinite(v)]
        for a, b in zip(pts[:-1], pts[1:]):
            cv2.line(img, a, b, color, 2, cv2.LINE_AA)
        for pt in pts:
            cv2.circle(img, pt, 4, color, -1)
        cv2.putText(img, name, (w - right - 220, top + 18 * idx), cv2.FONT_HERSHEY_SIMPLEX, 0.4, color, 1, cv2.LINE_AA)
    return img


def write_report(rows: Sequence[Dict[str, Any]], out_dir: Path, datasets: Sequence[str]) -> Path:
    """Write ``report.md`` and ``ap_per_round.png`` / ``pseudo_masks_per_round.png``; returns the Markdown path.

    Args:
        rows: per round ``{"round": int, "pseudo_masks": int, "metrics": {dataset: {iou_type: {key: %}}}}``.
        out_dir: the report folder.
        datasets: evaluated dataset names (column order).
    """
    from cutler.evaluation.report import markdown_table

    out_dir = Path(out_dir)
    header, table = report_rows(rows, datasets)
    rounds = [r["round"] for r in rows]
    ap_series = {h: [row[i] for row in table] for i, h in enumerate(header) if h.endswith((" AP", " AP50", " AR100"))}
    save_rgb_png(out_dir / "ap_per_round.png", line_plot(ap_series, rounds, "held-out AP / AR (%) per round"))
    save_rgb_png(out_dir / "pseudo_masks_per_round.png",
                 line_plot({"pseudo-masks": [float(r["pseudo_masks"]) for r in rows]}, rounds, "pseudo-masks per round"))
    text = ["# Pipeline report", "",
            "Pseudo-labels used to train each round and class-agnostic COCO metrics (%) on the held-out sets "
            "(`matched_*`: U2Seg's cluster ids mapped to the dataset's categories, per-category COCO metrics).", "",
            markdown_table(header, table), "",
            "![AP per round](ap_per_round.png)", "", "![pseudo-masks per round](pseudo_masks_per_round.png)", ""]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(text))
    return path
