"""Dense boolean masks as tensors: IoU and enclosing boxes.

The one dense mask IoU of the project: MaskCut's stage filter and CRF check, and the agreement figures of
the benchmarks, use :func:`mask_iou`; masks kept run-length encoded are compared with
:func:`cutler.structures.rle.rle_iou`.
"""
from __future__ import annotations

import torch
from torch import Tensor


def mask_iou(masks1: Tensor, masks2: Tensor, empty: float = 0.0) -> Tensor:
    """IoU of boolean masks flattened along the last dim: ``(..., P)`` and ``(..., P)`` -> ``(...)``
    float64 (an image mask ``(H, W)`` is passed as ``mask.flatten()``).

    ``empty`` is the value where both masks are empty (union 0): 0 for a filter that must reject the
    pair, 1 for an agreement figure where two empty masks agree.
    """
    inter = (masks1 & masks2).sum(dim=-1).double()
    union = (masks1 | masks2).sum(dim=-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(union, float(empty)))


def masks_to_boxes(masks: Tensor) -> Tensor:
    """``(N, 4)`` XYXY float boxes enclosing ``(N, H, W)`` bool masks (pixel edges: a single pixel at
    (x, y) gives (x, y, x+1, y+1)); empty masks give (0, 0, 0, 0)."""
    n = masks.shape[0]
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    m = masks.bool()
    rows = m.any(dim=2)
    cols = m.any(dim=1)
    h, w = m.shape[1:]
    ar_h = torch.arange(h, device=m.device)
    ar_w = torch.arange(w, device=m.device)
    big = torch.iinfo(torch.int64).max
    y0 = torch.where(rows, ar_h, big).min(dim=1).values
    y1 = torch.where(rows, ar_h, -1).max(dim=1).values + 1
    x0 = torch.where(cols, ar_w, big).min(dim=1).values
    x1 = torch.where(cols, ar_w, -1).max(dim=1).values + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    empty = ~rows.any(dim=1)
    boxes[empty] = 0.0
    return boxes
