"""Axis-aligned boxes: ``(N, 4)`` XYXY float tensors in pixels (Detectron2 conventions).

The one box IoU of the project: the detector (anchor and proposal matching, DropLoss) and CorLoc use it."""
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


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(N, 4)`` COCO XYWH boxes -> XYXY (``x1 = x + w``, ``y1 = y + h``); returns a new tensor."""
    return torch.cat((boxes[:, :2], boxes[:, :2] + boxes[:, 2:]), dim=1)
