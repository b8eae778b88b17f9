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


def save_rgb_png(path, image: np.ndarray) -> None:
    """Write an RGB uint8 array as PNG (atomically)."""
    from .io import atomic_write_bytes

    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"PNG encoding failed for {path}")
    atomic_write_bytes(path, buf.tobytes())
