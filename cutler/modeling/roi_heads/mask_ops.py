"""Pasting box-relative ``M x M`` mask probabilities into full images (Detectron2's ``paste_masks_in_image``).

Image pixel ``(x, y)`` has its centre at ``(x + 0.5, y + 0.5)``; the ``M x M`` mask spans the box
exactly, its cell ``i`` covering ``[x0 + i w / M, x0 + (i + 1) w / M]``. Each image pixel bilinearly
samples the mask at its centre (``grid_sample``, ``align_corners=False``, zero padding outside the
mask), then the probability is thresholded with ``>=``. This is the same arithmetic as Detectron2.
"""
from __future__ import annotations

import math
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
    # Bilinear sampling of the zero-padded mask is exactly 0 for pixel centres more than half a
    # mask cell outside the box; only the region inside that margin (+1 px for rounding) is computed.
    margin_x = widths.abs() / (2 * m) + 1
    margin_y = heights.abs() / (2 * m) + 1
    lo_x = torch.floor(boxes[:, 0] - margin_x)
    hi_x = torch.ceil(boxes[:, 2] + margin_x)
    lo_y = torch.floor(boxes[:, 1] - margin_y)
    hi_y = torch.ceil(boxes[:, 3] + margin_y)
    # Safe divisors: empty boxes are zeroed afterwards, this only keeps NaN out of grid_sample.
    safe_w = torch.where(nonempty, widths, torch.ones_like(widths))
    safe_h = torch.where(nonempty, heights, torch.ones_like(heights))
    chunk = max(1, int(max_chunk_bytes // (img_h * img_w * _BYTES_PER_PIXEL)))
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        # One host sync per chunk for the chunk's crop (the union of its boxes' reach).
        bounds = torch.stack([lo_x[sl].min(), lo_y[sl].min(), hi_x[sl].max(), hi_y[sl].max()]).tolist()
        x0i = int(min(max(bounds[0], 0), img_w))
        y0i = int(min(max(bounds[1], 0), img_h))
        x1i = int(min(max(bounds[2], 0), img_w))
        y1i = int(min(max(bounds[3], 0), img_h))
        if x1i <= x0i or y1i <= y0i:
            continue
        xs = torch.arange(x0i, x1i, device=device, dtype=torch.float32) + 0.5
        ys = torch.arange(y0i, y1i, device=device, dtype=torch.float32) + 0.5
        gx = (xs[None, :] - boxes[sl, 0:1]) / safe_w[sl, None] * 2 - 1  # (n, w) in [-1, 1] inside the box
        gy = (ys[None, :] - boxes[sl, 1:2]) / safe_h[sl, None] * 2 - 1  # (n, h)
        k = gx.shape[0]
        grid = torch.stack([gx[:, None, :].expand(k, gy.shape[1], gx.shape[1]),
                            gy[:, :, None].expand(k, gy.shape[1], gx.shape[1])], dim=3)
        sampled = F.grid_sample(mask_probs[sl, None].to(torch.float32), grid, mode="bilinear",
                                padding_mode="zeros", align_corners=False)[:, 0]
        out[sl, y0i:y1i, x0i:x1i] = (sampled >= threshold) & nonempty[sl, None, None]
    return out
