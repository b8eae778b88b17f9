"""Mask head: Detectron2's ``MaskRCNNConvUpsampleHead``, its loss targets, loss and inference."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import roi_align

from ..layers import conv3x3_norm_relu, c2_msra_fill

__all__ = ["MaskRCNNConvUpsampleHead", "crop_and_resize_masks", "mask_rcnn_loss", "mask_rcnn_inference"]


class MaskRCNNConvUpsampleHead(nn.Sequential):
    """``num_conv`` 3x3 convs + ReLU (``mask_fcn1``..), a 2x2 stride-2 deconv + ReLU (``deconv``) and a
    1x1 ``predictor`` with one output channel per class (1 if class-agnostic).

    Input ``(R, C, S, S)`` pooled features; output ``(R, num_mask_classes, 2S, 2S)`` logits.
    """

    def __init__(self, in_channels: int, num_classes: int, conv_dim: int = 256, num_conv: int = 4,
                 cls_agnostic_mask: bool = False, norm: str = ""):
        super().__init__()
        channels = in_channels
        for k in range(num_conv):
            self.add_module(f"mask_fcn{k + 1}", conv3x3_norm_relu(channels, conv_dim, norm))
            channels = conv_dim
        self.deconv = nn.ConvTranspose2d(channels, conv_dim, kernel_size=2, stride=2, padding=0)
        self.deconv_relu = nn.ReLU()
        self.predictor = nn.Conv2d(conv_dim, 1 if cls_agnostic_mask else num_classes, kernel_size=1)
        c2_msra_fill(self.deconv)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.constant_(self.predictor.bias, 0)


def crop_and_resize_masks(masks: Tensor, mask_index: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Mask-head targets: the part of a full-image mask under a box, resampled to ``size x size``.

    Detectron2's ``BitMasks.crop_and_resize``: ROIAlign (aligned=True, scale 1, adaptive sampling) of
    the 0/1 mask, then ``>= 0.5``. Indexing the GT masks by ``mask_index`` avoids copying one
    full-image mask per proposal.

    Args:
        masks: ``(M, H, W)`` bool/0-1 masks of one image; mask_index: ``(R,)`` int64 mask per box;
        boxes: ``(R, 4)`` XYXY boxes in the masks' pixels; size: output side (28).
    Returns: ``(R, size, size)`` bool.
    """
    if boxes.shape[0] == 0:
        return torch.zeros((0, size, size), dtype=torch.bool, device=masks.device)
    rois = torch.cat([mask_index.to(device=masks.device, dtype=torch.float32)[:, None],
                      boxes.to(device=masks.device, dtype=torch.float32)], dim=1)
    out = roi_align(masks[:, None].to(torch.float32), rois, (size, size), 1.0, 0, True)
    return out[:, 0] >= 0.5


def mask_rcnn_loss(mask_logits: Tensor, gt_classes: Tensor, targets: Tensor) -> Tensor:
    """Mean per-pixel sigmoid BCE of the GT class's mask over foreground proposals (float32).

    Args:
        mask_logits: ``(R, C, M, M)`` (C = 1 class-agnostic, or K); gt_classes: ``(R,)`` in [0, K);
        targets: ``(R, M, M)`` bool/float. Returns 0 (attached to the logits) when R == 0.
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    if mask_logits.shape[1] == 1:
        logits = mask_logits[:, 0]
    else:
        logits = mask_logits[torch.arange(mask_logits.shape[0], device=mask_logits.device), gt_classes]
    return F.binary_cross_entropy_with_logits(logits.float(), targets.to(torch.float32), reduction="mean")


def mask_rcnn_inference(mask_logits: Tensor, pred_classes: Tensor) -> Tensor:
    """``(R, M, M)`` float32 probabilities of each detection's predicted class (channel 0 if agnostic)."""
    if mask_logits.shape[1] == 1:
        logits = mask_logits[:, 0]
    else:
        logits = mask_logits[torch.arange(mask_logits.shape[0], device=mask_logits.device), pred_classes]
    return logits.float().sigmoid()


