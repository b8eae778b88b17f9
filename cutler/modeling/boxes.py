"""Axis-aligned box helpers on ``(N, 4)`` XYXY float tensors in pixels (Detectron2 conventions)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def box_area(boxes: Tensor) -> Tensor:
    """``(N,)`` areas of ``(N, 4)`` XYXY boxes (widths/heights are not clamped, like Detectron2)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def pairwise_intersection(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """``(N, M)`` intersection areas of ``(N, 4)`` and ``(M, 4)`` XYXY boxes."""
    wh = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:]) - torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    wh = wh.clamp_(min=0)
    return wh.prod(dim=2)


def pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """``(N, M)`` IoU; 0 where the intersection is empty (so degenerate boxes never give NaN)."""
    inter = pairwise_intersection(boxes1, boxes2)
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
    return torch.where(inter > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter))


def pairwise_ioa(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """``(N, M)`` intersection over the area of ``boxes2`` (0 where the intersection is empty)."""
    inter = pairwise_intersection(boxes1, boxes2)
    area2 = box_area(boxes2)[None, :]
    return torch.where(inter > 0, inter / area2.clamp(min=torch.finfo(inter.dtype).tiny), torch.zeros_like(inter))


def clip_boxes(boxes: Tensor, image_hw: Tuple[int, int]) -> Tensor:
    """Clip ``(N, 4)`` XYXY boxes to an image of ``(height, width)``; returns a new tensor."""
    h, w = image_hw
    x0 = boxes[:, 0].clamp(min=0, max=w)
    y0 = boxes[:, 1].clamp(min=0, max=h)
    x1 = boxes[:, 2].clamp(min=0, max=w)
    y1 = boxes[:, 3].clamp(min=0, max=h)
    return torch.stack((x0, y0, x1, y1), dim=-1)


def nonempty_boxes(boxes: Tensor, threshold: float = 0.0) -> Tensor:
    """``(N,)`` bool: width and height both strictly greater than ``threshold``."""
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return (widths > threshold) & (heights > threshold)


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
