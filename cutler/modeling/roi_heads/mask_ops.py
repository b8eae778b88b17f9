"""Pasting box-relative ``M x M`` mask probabilities into full images (Detectron2's ``paste_masks_in_image``).

Image pixel ``(x, y)`` has its centre at ``(x + 0.5, y + 0.5)``; the ``M x M`` mask spans the box
exactly, its cell ``i`` covering ``[x0 + i w / M, x0 + (i + 1) w / M]``. Each image pixel bilinearly
samples the mask at its centre (``grid_sample``, ``align_corners=False``, zero padding outside the
mask), then the probability is thresholded with ``>=``. This is the same arithmetic as Detectron2: the
result equals its GPU path (whole image) for any threshold, and its CPU path (which only computes
the box +- 1 px) for thresholds >= 0.5, where pixels outside the box cannot reach the threshold.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["paste_masks_in_image"]

# grid (2 floats) + sampled values (1 float) + the bool result, per pasted pixel, with slack.
_BYTES_PER_PIXEL = 16


def paste_masks_in_image(
    mask_probs: Tensor, boxes: Tensor, image_hw: Tuple[int, int], threshold: float = 0.5,
    max_chunk_bytes: int = 1 << 28,
) -> Tensor:
    """Paste per-detection mask probabilities into an image and threshold them.

    Args:
        mask_probs: ``(N, M, M)`` probabilities in [0, 1] (any float dtype).
        boxes: ``(N, 4)`` XYXY boxes in the pixels of the output image (may extend past its borders).
        image_hw: ``(H, W)`` of the output image.
        threshold: a pixel is on when its sampled probability ``>= threshold``; must be > 0 (pixels
            the mask does not reach sample exactly 0).
        max_chunk_bytes: bound on the temporary memory; masks are pasted in chunks of this size.
    Returns:
        ``(N, H, W)`` bool masks on the device of ``mask_probs``. Boxes with no width or height give
        empty masks.
    """
    if threshold <= 0:
        raise ValueError(f"paste_masks_in_image needs threshold > 0, got {threshold}")
    if mask_probs.dim() != 3 or mask_probs.shape[-1] != mask_probs.shape[-2]:
        raise ValueError(f"mask_probs must be (N, M, M), got {tuple(mask_probs.shape)}")
    n, m = mask_probs.shape[0], mask_probs.shape[-1]
    img_h, img_w = int(image_hw[0]), int(image_hw[1])
    device = mask_probs.device
    out = torch.zeros((n, img_h, img_w), dtype=torch.bool, device=device)
    if n == 0 or img_h == 0 or img_w == 0:
        return out
    boxes = boxes.to(device=device, dtype=torch.float32)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    nonempty = (widths > 0) & (heights > 0)
    # Bilinear sampling of the zero-padded mask is exactly 0 for pixel centres more than half a mask
    # cell outside the box, so each mask is only evaluated on its own window: the box plus that
    # margin (+1 px for rounding), clipped to the image.
    margin_x = widths.abs() / (2 * m) + 1
    margin_y = heights.abs() / (2 * m) + 1
    lo_x = torch.floor(boxes[:, 0] - margin_x).clamp(0, img_w).to(torch.int64)
    hi_x = torch.ceil(boxes[:, 2] + margin_x).clamp(0, img_w).to(torch.int64)
    lo_y = torch.floor(boxes[:, 1] - margin_y).clamp(0, img_h).to(torch.int64)
    hi_y = torch.ceil(boxes[:, 3] + margin_y).clamp(0, img_h).to(torch.int64)
    # Windows of one chunk share the largest window's size; the bound below uses the largest overall.
    win_w, win_h = (int(v) for v in torch.stack([(hi_x - lo_x).max(), (hi_y - lo_y).max()]).tolist())
    if win_w <= 0 or win_h <= 0:
        return out
    # Safe divisors: empty boxes are masked out afterwards; this only keeps NaN out of grid_sample.
    safe_w = torch.where(nonempty, widths, torch.ones_like(widths))
    safe_h = torch.where(nonempty, heights, torch.ones_like(heights))
    chunk = max(1, int(max_chunk_bytes // (win_h * win_w * _BYTES_PER_PIXEL)))
    ar_x = torch.arange(win_w, device=device)
    ar_y = torch.arange(win_h, device=device)
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        xs = lo_x[sl, None] + ar_x[None, :]  # (k, win_w) image columns of each window
        ys = lo_y[sl, None] + ar_y[None, :]  # (k, win_h)
        gx = (xs.to(torch.float32) + 0.5 - boxes[sl, 0:1]) / safe_w[sl, None] * 2 - 1  # [-1, 1] inside the box
        gy = (ys.to(torch.float32) + 0.5 - boxes[sl, 1:2]) / safe_h[sl, None] * 2 - 1
        k = gx.shape[0]
        grid = torch.stack([gx[:, None, :].expand(k, win_h, win_w), gy[:, :, None].expand(k, win_h, win_w)], dim=3)
        sampled = F.grid_sample(mask_probs[sl, None].to(torch.float32), grid, mode="bilinear",
                                padding_mode="zeros", align_corners=False)[:, 0]
        on = (sampled >= threshold) & nonempty[sl, None, None]
        on &= (xs < hi_x[sl, None])[:, None, :] & (ys < hi_y[sl, None])[:, :, None]  # window inside the image
        i, r, c = torch.nonzero(on, as_tuple=True)
        out[i + start, ys[i, r], xs[i, c]] = True  # out starts all False: only "on" pixels are written
    return out
