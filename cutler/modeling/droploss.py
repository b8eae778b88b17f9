"""DropLoss, CutLER's exploration loss for the ROI box classifier, as pure functions.

MaskCut pseudo-labels miss many objects, so a proposal whose box does not touch any pseudo
ground truth may well be an unlabelled object: its "background" classification loss is dropped.
For each proposal, the box PREDICTED for it (the head's deltas applied to the proposal) is compared
with every ground-truth box of its own image; if the best IoU is ``<= iou_thresh`` the proposal's
cross-entropy weight is 0, otherwise 1. Images without ground truth keep the plain loss (weight 1).
The weighted cross-entropy is averaged over ALL proposals (dropped ones count in the denominator).

Unlike the published implementation (which recovers ground truth by de-duplicating the boxes that
proposals were matched to, and so misses unmatched ground truth), the weights here use each image's
true ground-truth boxes.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from ..structures.boxes import pairwise_iou

__all__ = ["max_iou_with_gt", "droploss_weights", "droploss_cross_entropy"]

# IoU rows are computed for this many proposals at a time, bounding memory to CHUNK x total GT.
_CHUNK = 4096


def max_iou_with_gt(pred_boxes: Tensor, image_index: Tensor, gt_boxes: Sequence[Tensor]) -> Tensor:
    """Best IoU of each box with the ground truth of its own image.

    Args:
        pred_boxes: ``(R, 4)`` XYXY boxes (all images concatenated).
        image_index: ``(R,)`` int64 image of each box, in ``[0, len(gt_boxes))``.
        gt_boxes: per-image ``(Mi, 4)`` XYXY ground-truth boxes.
    Returns:
        ``(R,)`` float32 max IoU; -1 for boxes of images without ground truth.
    """
    device = pred_boxes.device
    counts = torch.tensor([len(g) for g in gt_boxes], device=device, dtype=torch.int64)
    result = torch.full((pred_boxes.shape[0],), -1.0, device=device)
    if pred_boxes.shape[0] == 0 or int(counts.sum()) == 0:
        return result
    all_gt = torch.cat([g.reshape(-1, 4) for g in gt_boxes], dim=0).to(device=device, dtype=torch.float32)
    gt_image = torch.repeat_interleave(torch.arange(len(gt_boxes), device=device), counts)
    boxes = pred_boxes.detach().float()
    for start in range(0, boxes.shape[0], _CHUNK):
        stop = start + _CHUNK
        iou = pairwise_iou(boxes[start:stop], all_gt)  # (chunk, total GT)
        same_image = image_index[start:stop, None] == gt_image[None, :]
        # IoU is >= 0, so -1 marks "another image's GT" and survives the max only without own GT.
        result[start:stop] = torch.where(same_image, iou, torch.full_like(iou, -1.0)).max(dim=1).values
    return result


def droploss_weights(pred_boxes: Tensor, image_index: Tensor, gt_boxes: Sequence[Tensor], iou_thresh: float) -> Tensor:
    """``(R,)`` float32 classification-loss weights: 0 where max IoU with own-image GT ``<= iou_thresh``,
    else 1; 1 for every box of an image without ground truth. Arguments as :func:`max_iou_with_gt`."""
    max_iou = max_iou_with_gt(pred_boxes, image_index, gt_boxes)
    has_gt = max_iou >= 0
    return torch.where(has_gt & (max_iou <= iou_thresh), 0.0, 1.0).to(torch.float32)


def droploss_cross_entropy(logits: Tensor, gt_classes: Tensor, weights: Tensor) -> Tensor:
    """``sum_r weights[r] * CE(logits[r], gt_classes[r]) / R`` in float32.

    Args:
        logits: ``(R, K + 1)`` class logits; gt_classes: ``(R,)`` int64 targets; weights: ``(R,)``.
    Returns: scalar; 0 (still attached to ``logits``) when R == 0.
    """
    if gt_classes.numel() == 0:
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits.float(), gt_classes, reduction="none")
    return (ce * weights.detach().float()).sum() / gt_classes.numel()
