"""Fast R-CNN box predictor: layers, losses and per-image inference (Detectron2 conventions).

Shapes: R proposals over the whole batch, K foreground classes; class index K is background.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import batched_nms, complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

from ...structures.boxes import clip_boxes
from ..box_coding import Box2BoxTransform
from ..droploss import droploss_cross_entropy

__all__ = ["FastRCNNOutputLayers", "box_regression_loss", "fast_rcnn_losses", "fast_rcnn_inference",
           "fast_rcnn_inference_single_image"]


class FastRCNNOutputLayers(nn.Module):
    """``cls_score`` (K + 1 logits) and ``bbox_pred`` (4 class-agnostic or 4K class-specific deltas).

    Input ``(R, D)`` (or ``(R, C, S, S)``, flattened); output ``(scores (R, K+1), deltas (R, 4 or 4K))``.
    Init as Detectron2: N(0, 0.01) for ``cls_score``, N(0, 0.001) for ``bbox_pred``, zero biases.
    """

    def __init__(self, input_size: int, num_classes: int, cls_agnostic_bbox_reg: bool = False, box_dim: int = 4):
        super().__init__()
        self.num_classes = int(num_classes)
        self.cls_agnostic_bbox_reg = bool(cls_agnostic_bbox_reg)
        self.cls_score = nn.Linear(input_size, self.num_classes + 1)
        num_reg = 1 if self.cls_agnostic_bbox_reg else self.num_classes
        self.bbox_pred = nn.Linear(input_size, num_reg * box_dim)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.constant_(self.cls_score.bias, 0)
        nn.init.constant_(self.bbox_pred.bias, 0)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


def _smooth_l1_sum(pred: Tensor, target: Tensor, beta: float) -> Tensor:
    # Detectron2 treats beta < 1e-5 as exact L1 (no quadratic zone at all).
    diff = torch.abs(pred - target)
    if beta < 1e-5:
        return diff.sum()
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta).sum()


def _fg_deltas(deltas: Tensor, gt_classes: Tensor, num_classes: int) -> Tuple[Tensor, Tensor]:
    """Indices of foreground proposals and their predicted deltas (the GT class's, if class-specific)."""
    fg = torch.nonzero((gt_classes >= 0) & (gt_classes < num_classes), as_tuple=True)[0]
    if deltas.shape[1] == 4:
        return fg, deltas[fg]
    return fg, deltas.view(deltas.shape[0], -1, 4)[fg, gt_classes[fg]]


def box_regression_loss(
    deltas: Tensor, proposal_boxes: Tensor, gt_boxes: Tensor, gt_classes: Tensor, num_classes: int,
    box2box: Box2BoxTransform, loss_type: str = "smooth_l1", smooth_l1_beta: float = 0.0,
) -> Tensor:
    """Box loss on foreground proposals, summed, divided by the number of ALL proposals (Detectron2).

    Args:
        deltas: ``(R, 4)`` or ``(R, 4K)`` predicted deltas; proposal_boxes, gt_boxes: ``(R, 4)`` XYXY
            (gt_boxes is only read on foreground rows); gt_classes: ``(R,)`` in [0, K] (K = bg, -1 = ignore).
        loss_type: "smooth_l1" (on encoded deltas) or "giou" / "diou" / "ciou" (on decoded boxes).
    Returns: float32 scalar (0 with gradient support when there is no foreground).
    """
    fg, fg_deltas = _fg_deltas(deltas.float(), gt_classes, num_classes)
    fg_proposals = proposal_boxes[fg].float()
    fg_gt = gt_boxes[fg].float()
    if loss_type == "smooth_l1":
        loss = _smooth_l1_sum(fg_deltas, box2box.get_deltas(fg_proposals, fg_gt), smooth_l1_beta)
    elif loss_type in ("giou", "diou", "ciou"):
        fn = {"giou": generalized_box_iou_loss, "diou": distance_box_iou_loss, "ciou": complete_box_iou_loss}[loss_type]
        pred_boxes = box2box.apply_deltas(fg_deltas, fg_proposals)
        loss = fn(pred_boxes, fg_gt, reduction="sum", eps=1e-7) if fg.numel() else fg_deltas.sum() * 0.0
    else:
        raise ValueError(f"Unsupported box regression loss {loss_type!r}")
    # Normalising by all R (not the foreground count) gives every foreground box the same weight
    # whatever the batch's foreground fraction, as in Detectron2.
    return loss / max(gt_classes.numel(), 1)


def fast_rcnn_losses(
    scores: Tensor, deltas: Tensor, proposal_boxes: Tensor, gt_classes: Tensor, gt_boxes: Tensor,
    num_classes: int, box2box: Box2BoxTransform, loss_type: str = "smooth_l1", smooth_l1_beta: float = 0.0,
    box_loss_weight: float = 1.0, cls_weights: Optional[Tensor] = None,
) -> Dict[str, Tensor]:
    """``{"loss_cls", "loss_box_reg"}`` in float32 for one box predictor.

    ``loss_cls`` is the softmax cross-entropy averaged over all R proposals; with ``cls_weights``
    (``(R,)``, DropLoss) each proposal's term is multiplied by its weight before averaging over R.
    """
    if cls_weights is None:
        loss_cls = F.cross_entropy(scores.float(), gt_classes, reduction="mean") if gt_classes.numel() else scores.sum() * 0.0
    else:
        loss_cls = droploss_cross_entropy(scores, gt_classes, cls_weights)
    loss_box = box_regression_loss(deltas, proposal_boxes, gt_boxes, gt_classes, num_classes, box2box,
                                   loss_type, smooth_l1_beta)
    return {"loss_cls": loss_cls, "loss_box_reg": loss_box * box_loss_weight}


def fast_rcnn_inference_single_image(
    boxes: Tensor, scores: Tensor, image_hw: Tuple[int, int], score_thresh: float, nms_thresh: float, topk: int,
) -> Dict[str, Tensor]:
    """Detections of one image.

    Args:
        boxes: ``(Ri, 4)`` class-agnostic or ``(Ri, 4K)`` class-specific decoded XYXY boxes.
        scores: ``(Ri, K + 1)`` class probabilities (last column background).
        image_hw: the image size (before padding) to clip to.
        score_thresh: keep (box, class) pairs with probability strictly above it.
        nms_thresh: IoU threshold of the per-class NMS; topk: detections kept (< 0 = all).
    Returns:
        ``{"boxes": (N, 4), "scores": (N,), "classes": (N,) int64, "indices": (N,) proposal row}``,
        sorted by decreasing score.
    """
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    rows = torch.arange(boxes.shape[0], device=boxes.device)
    if not bool(valid.all()):
        boxes, scores, rows = boxes[valid], scores[valid], rows[valid]
    scores = scores[:, :-1]
    num_reg = boxes.shape[1] // 4
    boxes = clip_boxes(boxes.reshape(-1, 4), image_hw).view(-1, num_reg, 4)
    keep_mask = scores > score_thresh
    idx = torch.nonzero(keep_mask)  # (N', 2): proposal row, class
    boxes = boxes[idx[:, 0], 0] if num_reg == 1 else boxes[keep_mask]
    scores = scores[keep_mask]
    keep = batched_nms(boxes.float(), scores.float(), idx[:, 1], nms_thresh)
    if topk >= 0:
        keep = keep[:topk]
    return {"boxes": boxes[keep], "scores": scores[keep], "classes": idx[keep, 1], "indices": rows[idx[keep, 0]]}


def fast_rcnn_inference(
    boxes: Sequence[Tensor], scores: Sequence[Tensor], image_sizes: Sequence[Tuple[int, int]],
    score_thresh: float, nms_thresh: float, topk: int,
) -> List[Dict[str, Tensor]]:
    """:func:`fast_rcnn_inference_single_image` for each image (NMS stays per image, as Detectron2)."""
    return [fast_rcnn_inference_single_image(b, s, hw, score_thresh, nms_thresh, topk)
            for b, s, hw in zip(boxes, scores, image_sizes)]
