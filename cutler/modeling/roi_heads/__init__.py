"""ROI heads (standard and cascade), mask head, and mask pasting.

``build_roi_heads(cfg, input_shape)`` returns a module called as
``roi_heads(features, proposals, image_sizes, targets=None) -> (detections, losses)``:

- features: ``{"p2": (N, C, H2, W2), ...}`` (at least ``model.roi_heads.in_features``);
- proposals: per image ``(Ri, 4)`` XYXY boxes in resized-image pixels (detached);
- image_sizes: per image ``(h, w)`` before padding;
- targets (training): per image ``{"boxes": (M, 4) float XYXY, "classes": (M,) int64 in [0, K),
  "masks": (M, H, W) bool}`` (masks only with ``model.mask_on``).

Training returns ``([], losses)`` with ``loss_cls_stage{k}``/``loss_box_reg_stage{k}`` (cascade) or
``loss_cls``/``loss_box_reg`` (standard), plus ``loss_mask``. Evaluation returns one dict per image
``{"boxes": (N, 4), "scores": (N,), "classes": (N,) int64, "mask_probs": (N, M, M)}`` and ``{}``.
"""
from __future__ import annotations

from typing import Dict

from torch import nn

from ..shape_spec import ShapeSpec
from .box_head import FastRCNNConvFCHead
from .cascade import CascadeROIHeads
from .fast_rcnn import FastRCNNOutputLayers, fast_rcnn_inference
from .mask_head import MaskRCNNConvUpsampleHead
from .mask_ops import paste_masks_in_image
from .standard import StandardROIHeads

__all__ = ["build_roi_heads", "paste_masks_in_image", "CascadeROIHeads", "StandardROIHeads",
           "FastRCNNConvFCHead", "FastRCNNOutputLayers", "MaskRCNNConvUpsampleHead", "fast_rcnn_inference"]

CASCADE_NAMES = ("CascadeROIHeads", "CustomCascadeROIHeads")
STANDARD_NAMES = ("StandardROIHeads", "CustomStandardROIHeads")


def build_roi_heads(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """The ROI heads named by ``model.roi_heads.name`` (cascade or standard), built from ``cfg``."""
    name = cfg.model.roi_heads.name
    if name in CASCADE_NAMES:
        return CascadeROIHeads.from_config(cfg, input_shape)
    if name in STANDARD_NAMES:
        return StandardROIHeads.from_config(cfg, input_shape)
    raise ValueError(f"Unknown model.roi_heads.name {name!r}; expected one of {CASCADE_NAMES + STANDARD_NAMES}")
