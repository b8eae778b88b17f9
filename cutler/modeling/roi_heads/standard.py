"""Mask R-CNN ROI heads with one box head (Detectron2's ``StandardROIHeads``, CutLER's Custom* alias)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..box_coding import Box2BoxTransform
from ..shape_spec import ShapeSpec
from .base import ROIHeadsBase, Target, input_shape_args
from .box_head import FastRCNNConvFCHead
from .fast_rcnn import FastRCNNOutputLayers, fast_rcnn_inference, fast_rcnn_losses

__all__ = ["StandardROIHeads", "box_head_from_config"]


def box_head_from_config(cfg, in_channels: int) -> FastRCNNConvFCHead:
    """``FastRCNNConvFCHead`` sized by ``model.roi_box_head`` (num_conv/conv_dim/num_fc/fc_dim/norm)."""
    bh = cfg.model.roi_box_head
    return FastRCNNConvFCHead(in_channels, bh.pooler_resolution, [bh.conv_dim] * bh.num_conv,
                              [bh.fc_dim] * bh.num_fc, bh.norm)


def predicted_boxes_for_droploss(box2box: Box2BoxTransform, scores: Tensor, deltas: Tensor, proposals: Tensor) -> Tensor:
    """``(R, 4)`` box each proposal is predicted to become: the class-agnostic box, or with
    class-specific regression the box of the highest-scoring foreground class."""
    boxes = box2box.apply_deltas(deltas.detach(), proposals)
    if boxes.shape[1] == 4:
        return boxes
    best = scores.detach()[:, :-1].argmax(dim=1)
    return boxes.view(boxes.shape[0], -1, 4)[torch.arange(boxes.shape[0], device=boxes.device), best]


class StandardROIHeads(ROIHeadsBase):
    """One box head + predictor (``box_head``, ``box_predictor``) and the optional ``mask_head``.

    Call: ``(features, proposals, image_sizes, targets) -> (detections, losses)``, see
    :func:`cutler.modeling.roi_heads.build_roi_heads`.
    """

    def __init__(self, *, box_head: FastRCNNConvFCHead, bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
                 cls_agnostic_bbox_reg: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.box_head = box_head
        self.box_predictor = FastRCNNOutputLayers(box_head.output_size, self.num_classes, cls_agnostic_bbox_reg)
        self.box2box = Box2BoxTransform(bbox_reg_weights)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> "StandardROIHeads":
        args = input_shape_args(cfg, input_shape)
        return cls(box_head=box_head_from_config(cfg, args["in_channels"]),
                   bbox_reg_weights=list(cfg.model.roi_box_head.bbox_reg_weights),
                   cls_agnostic_bbox_reg=cfg.model.roi_box_head.cls_agnostic_bbox_reg, **args)

    def forward(self, features: Dict[str, Tensor], proposals: List[Tensor], image_sizes: List[Tuple[int, int]],
                targets: Optional[List[Target]] = None) -> Tuple[List[Dict[str, Tensor]], Dict[str, Tensor]]:
        feats = self._features(features)
        if self.training:
            if targets is None:
                raise ValueError("ROI heads need targets in training mode")
            batch = self.label_and_sample_proposals(proposals, targets)
            scores, deltas = self.box_predictor(self.box_head(self.box_pooler(feats, batch.rois())))
            weights = None
            if self.use_droploss:
                weights = self.drop_weights(
                    predicted_boxes_for_droploss(self.box2box, scores, deltas, batch.boxes), batch, targets)
            losses = fast_rcnn_losses(scores, deltas, batch.boxes, batch.gt_classes, batch.gt_boxes, self.num_classes,
                                      self.box2box, self.box_reg_loss_type, self.smooth_l1_beta,
                                      self.box_reg_loss_weight, weights)
            if self.mask_on:
                losses["loss_mask"] = self._mask_loss(feats, batch, targets)
            return [], losses
        batch = self.batch_proposals(proposals)
        scores, deltas = self.box_predictor(self.box_head(self.box_pooler(feats, batch.rois())))
        boxes = self.box2box.apply_deltas(deltas, batch.boxes)
        probs = torch.softmax(scores.float(), dim=-1)
        results = fast_rcnn_inference(boxes.split(batch.counts), probs.split(batch.counts), image_sizes,
                                      self.score_thresh_test, self.nms_thresh_test, self.detections_per_image)
        return self._finish_inference(feats, results), {}

