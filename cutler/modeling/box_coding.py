"""Box regression coding: Detectron2's ``Box2BoxTransform`` convention.

deltas = (wx * dx / w, wy * dy / h, ww * log(w' / w), wh * log(h' / h)) with centres
``x0 + 0.5 w`` and widths ``x1 - x0`` (no +1), decoded widths clamped at ``log(1000 / 16)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class Box2BoxTransform:
    """Encode/decode boxes relative to reference boxes with per-coordinate weights ``(wx, wy, ww, wh)``."""

    def __init__(self, weights: Sequence[float], scale_clamp: float = DEFAULT_SCALE_CLAMP):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def get_deltas(self, src_boxes: Tensor, target_boxes: Tensor) -> Tensor:
        """``(N, 4)`` deltas that turn ``(N, 4)`` XYXY ``src_boxes`` into ``target_boxes``."""
        src_w = src_boxes[:, 2] - src_boxes[:, 0]
        src_h = src_boxes[:, 3] - src_boxes[:, 1]
        src_cx = src_boxes[:, 0] + 0.5 * src_w
        src_cy = src_boxes[:, 1] + 0.5 * src_h
        tgt_w = target_boxes[:, 2] - target_boxes[:, 0]
        tgt_h = target_boxes[:, 3] - target_boxes[:, 1]
        tgt_cx = target_boxes[:, 0] + 0.5 * tgt_w
        tgt_cy = target_boxes[:, 1] + 0.5 * tgt_h
        wx, wy, ww, wh = self.weights
        return torch.stack(
            (wx * (tgt_cx - src_cx) / src_w, wy * (tgt_cy - src_cy) / src_h,
             ww * torch.log(tgt_w / src_w), wh * torch.log(tgt_h / src_h)),
            dim=1,
        )

    def apply_deltas(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """Decode ``(N, 4k)`` deltas against ``(N, 4)`` XYXY boxes into ``(N, 4k)`` XYXY boxes."""
        deltas = deltas.float()
        boxes = boxes.to(deltas.dtype)
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.scale_clamp)
        pred_cx = dx * widths[:, None] + ctr_x[:, None]
        pred_cy = dy * heights[:, None] + ctr_y[:, None]
        pred_w = torch.exp(dw) * widths[:, None]
        pred_h = torch.exp(dh) * heights[:, None]
        x0 = pred_cx - 0.5 * pred_w
        y0 = pred_cy - 0.5 * pred_h
        x1 = pred_cx + 0.5 * pred_w
        y1 = pred_cy + 0.5 * pred_h
        return torch.stack((x0, y0, x1, y1), dim=-1).reshape(deltas.shape)
