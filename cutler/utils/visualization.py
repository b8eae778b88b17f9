"""Pictures a person would rather look at than read: masks, boxes and scores drawn over images."""
from __future__ import annotations

from typing import Optional, Sequence

import cv2
import numpy as np


def color_palette(n: int, seed: int = 3) -> np.ndarray:
    """``(n, 3)`` uint8 distinct-looking RGB colours (golden-ratio hues, deterministic)."""
    hues = (np.arange(n) * 0.618033988749895 + seed * 0.1) % 1.0
    hsv = np.stack([hues * 179, np.full(n, 200), np.full(n, 255)], axis=1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]


def overlay_instances(
    image: np.ndarray,
    masks: Optional[np.ndarray] = None,
    boxes: Optional[np.ndarray] = None,
    scores: Optional[Sequence[float]] = None,
    labels: Optional[Sequence[str]] = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Draw instances over an RGB image.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        masks: ``(N, H, W)`` bool/0-1 masks, or None.
        boxes: ``(N, 4)`` XYXY pixel boxes, or None.
        scores: N floats printed beside the boxes, or None.
        labels: N strings printed before the scores, or None.
        alpha: mask opacity.

    Returns:
        ``(H, W, 3)`` uint8 RGB picture (the input is not modified).
    """
    out = image.astype(np.float32).copy()
    n = max(len(masks) if masks is not None else 0, len(boxes) if boxes is not None else 0)
    colors = color_palette(max(n, 1)).astype(np.float32)
    if masks is not None:
        for i, m in enumerate(masks):
            m = np.asarray(m).astype(bool)
            out[m] = out[m] * (1 - alpha) + colors[i] * alpha
    out = out.clip(0, 255).astype(np.uint8)
    if masks is not None:
        for i, m in enumerate(masks):
            contours, _ = cv2.findContours(np.asarray(m).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(out, contours, -1, tuple(int(c) for c in colors[i]), 1)
    if boxes is not None:
        for i, b in enumerate(np.asarray(boxes).reshape(-1, 4)):
            x0, y0, x1, y1 = (int(round(v)) for v in b)
            color = tuple(int(c) for c in colors[i])
            cv2.rectangle(out, (x0, y0), (x1, y1), color, 2)
            text = " ".join(t for t in (labels[i] if labels else "", f"{scores[i]:.2f}" if scores is not None else "") if t)
            if text:
                cv2.putText(out, text, (x0 + 2, max(y0 - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1, cv2.LINE_AA)
    return out


def overlay_panoptic(image: np.ndarray, seg: np.ndarray, segments: Sequence[dict], thing_names: Optional[dict] = None,
                     stuff_names: Optional[dict] = None, alpha: float = 0.55) -> np.ndarray:
    """Draw a panoptic segmentation over an RGB image: stuff regions tinted with one colour per stuff class,
    things with one colour per instance, outlined and labelled with their name (default: the cluster id) and score.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        seg: ``(H, W)`` segment ids (0 = void, left as is).
        segments: ``[{"id", "category_id", "isthing", "score"?}]``.
        thing_names, stuff_names: category id -> text.
        alpha: tint opacity.

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    out = image.astype(np.float32).copy()
    things = [s for s in segments if s.get("isthing")]
    stuff = [s for s in segments if not s.get("isthing")]
    stuff_colors = color_palette(max([int(s["category_id"]) for s in stuff], default=0) + 1, seed=7).astype(np.float32)
    thing_colors = color_palette(max(len(things), 1)).astype(np.float32)
    for s in stuff:
        m = seg == s["id"]
        out[m] = out[m] * (1 - alpha) + stuff_colors[int(s["category_id"])] * alpha
    for i, s in enumerate(things):
        m = seg == s["id"]
        out[m] = out[m] * (1 - alpha) + thing_colors[i] * alpha
    out = out.clip(0, 255).astype(np.uint8)
    for i, s in enumerate(things):
        m = (seg == s["id"]).astype(np.uint8)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        color = tuple(int(c) for c in thing_colors[i])
        cv2.drawContours(out, contours, -1, color, 1)
        ys, xs = np.nonzero(m)
        if len(xs):
            name = (thing_names or {}).get(int(s["category_id"]), str(s["category_id"]))
            text = f"{name} {s['score']:.2f}" if "score" in s else name
            cv2.putText(out, text, (int(xs.min()), max(int(ys.min()) - 3, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, color, 1,
                        cv2.LINE_AA)
    for s in stuff:
        ys, xs = np.nonzero(seg == s["id"])
        if len(xs):
            name = (stuff_names or {}).get(int(s["category_id"]), f"stuff {s['category_id']}")
            cv2.putText(out, name, (int(np.median(xs)), int(np.median(ys))), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                        (255, 255, 255), 1, cv2.LINE_AA)
    return out


def save_rgb_png(path, image: np.ndarray) -> None:
    """Write an RGB uint8 array as PNG (atomically)."""
    from .io import atomic_write_bytes

    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {path}")
    atomic_write_bytes(path, buf.tobytes())
