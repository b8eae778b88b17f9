"""Cascade R-CNN ROI heads (Detectron2's ``CascadeROIHeads``; CutLER's ``CustomCascadeROIHeads`` + DropLoss).

Stage k pools its input boxes, runs its own box head/predictor (keys ``box_head.k``,
``box_predictor.k``) and decodes class-agnostic boxes with its own delta weights. Stage 1's input is
the sampled proposals; stage k > 1's input is stage k-1's predicted boxes, detached and clipped to the
image (in training also: empty boxes removed, then relabelled with stage k's IoU threshold, no
sampling, no GT appended). Inference averages the stages' class probabilities, each computed on that
stage's own input boxes, and takes the boxes from the last stage.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ...structures.boxes import nonempty_boxes
from ..box_coding import Box2BoxTransform
from ..matcher import Matcher
from ..shape_spec import ShapeSpec
from .base import ProposalBatch, ROIHeadsBase, Target, clip_boxes_per_image, input_shape_args, scale_gradient
from .box_head import FastRCNNConvFCHead
from .fast_rcnn import FastRCNNOutputLayers, fast_rcnn_inference, fast_rcnn_losses
from .standard import box_head_from_config

__all__ = ["CascadeROIHeads"]


class CascadeROIHeads(ROIHeadsBase):
    """Cascade box branch (class-agnostic regression) + the optional mask branch.

    Args:
        box_heads: one box head per stage; ious: matching IoU per stage; bbox_reg_weights: per stage.
        Other arguments: :class:`ROIHeadsBase`. As in Detectron2, stage 1 is labelled while sampling
        with ``model.roi_heads.iou_thresholds`` (0.5 by default, like ``ious[0]``); ``ious[k]`` labels
        stage k + 1's boxes for k >= 1.
    """

    def __init__(self, *, box_heads: Sequence[FastRCNNConvFCHead], ious: Sequence[float],
                 bbox_reg_weights: Sequence[Sequence[float]], **kwargs):
        if not (len(box_heads) == len(ious) == len(bbox_reg_weights)):
            raise ValueError("Cascade needs one box head, IoU and weight tuple per stage")
        super().__init__(**kwargs)
        self.num_stages = len(box_heads)
        self.box_head = nn.ModuleList(box_heads)
        self.box_predictor = nn.ModuleList(
            FastRCNNOutputLayers(h.output_size, self.num_classes, cls_agnostic_bbox_reg=True) for h in box_heads)
        self.box2box = [Box2BoxTransform(w) for w in bbox_reg_weights]
        self.stage_matchers = [Matcher([iou], [0, 1], allow_low_quality_matches=False) for iou in ious]

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> "CascadeROIHeads":
        if not cfg.model.roi_box_head.cls_agnostic_bbox_reg:
            raise ValueError("CascadeROIHeads needs model.roi_box_head.cls_agnostic_bbox_reg=true (as Detectron2)")
        ch = cfg.model.roi_box_cascade_head
        ious = list(ch.ious)
        if abs(ious[0] - cfg.model.roi_heads.iou_thresholds[0]) > 1e-9:
            # Stage 1 is labelled by the sampler with roi_heads.iou_thresholds; Detectron2 requires both equal.
            raise ValueError(f"model.roi_box_cascade_head.ious[0] ({ious[0]}) must equal "
                             f"model.roi_heads.iou_thresholds[0] ({cfg.model.roi_heads.iou_thresholds[0]})")
        weights = [list(w) for w in ch.bbox_reg_weights]
        args = input_shape_args(cfg, input_shape)
        heads = [box_head_from_config(cfg, args["in_channels"]) for _ in ious]
        return cls(box_heads=heads, ious=ious, bbox_reg_weights=weights, **args)

    def run_stage(self, features: List[Tensor], batch: ProposalBatch, stage: int) -> Tuple[Tensor, Tensor]:
        """``(scores (R, K+1), deltas (R, 4))`` of stage ``stage`` on ``batch.boxes``."""
        pooled = self.box_pooler(features, batch.rois())
        if self.training:
            # Summing the stages' losses would give the shared features num_stages times the
            # gradient; Detectron2 scales it back here (the heads keep full gradients).
            pooled = scale_gradient(pooled, 1.0 / self.num_stages)
        return self.box_predictor[stage](self.box_head[stage](pooled))

    def _next_stage_boxes(self, pred_boxes: Tensor, batch: ProposalBatch,
                          image_sizes: Sequence[Tuple[int, int]]) -> ProposalBatch:
        boxes = clip_boxes_per_image(pred_boxes.detach(), batch.image_index, image_sizes)
        image_index = batch.image_index
        if self.training:
            # Empty boxes cannot be pooled meaningfully; at inference they are kept so every stage
            # scores the same rows and the probabilities can be averaged.
            keep = nonempty_boxes(boxes)
            boxes, image_index = boxes[keep], image_index[keep]
        counts = torch.bincount(image_index, minlength=len(batch.counts)).tolist()
        return ProposalBatch(boxes, image_index, counts)

    def forward(self, features: Dict[str, Tensor], proposals: List[Tensor], image_sizes: List[Tuple[int, int]],
                targets: Optional[List[Target]] = None) -> Tuple[List[Dict[str, Tensor]], Dict[str, Tensor]]:
        feats = self._features(features)
        if self.training:
            if targets is None:
                raise ValueError("ROI heads need targets in training mode")
            first = self.label_and_sample_proposals(proposals, targets)
            batch = first
            losses: Dict[str, Tensor] = {}
            for k in range(self.num_stages):
                if k > 0:
                    nxt = self._next_stage_boxes(pred_boxes, batch, image_sizes)
                    batch = self.match_boxes(nxt.boxes, nxt.image_index, nxt.counts, targets, self.stage_matchers[k])
                scores, deltas = self.run_stage(feats, batch, k)
                pred_boxes = self.box2box[k].apply_deltas(deltas, batch.boxes)
                weights = self.drop_weights(pred_boxes, batch, targets)
                stage = fast_rcnn_losses(scores, deltas, batch.boxes, batch.gt_classes, batch.gt_boxes,
                                         self.num_classes, self.box2box[k], self.box_reg_loss_type,
                                         self.smooth_l1_beta, self.box_reg_loss_weight, weights)
                losses.update({f"{name}_stage{k}": value for name, value in stage.items()})
            if self.mask_on:
                # As Detectron2: the mask head trains on the stage-1 sampled proposals.
                losses["loss_mask"] = self._mask_loss(feats, first, targets)
            return [], losses

        batch = self.batch_proposals(proposals)
        prob_sum: Optional[Tensor] = None
        for k in range(self.num_stages):
            if k > 0:
                batch = self._next_stage_boxes(pred_boxes, batch, image_sizes)
            scores, deltas = self.run_stage(feats, batch, k)
            probs = torch.softmax(scores.float(), dim=-1)
            prob_sum = probs if prob_sum is None else prob_sum + probs
            pred_boxes = self.box2box[k].apply_deltas(deltas, batch.boxes)
        probs = prob_sum * (1.0 / self.num_stages)
        results = fast_rcnn_inference(pred_boxes.split(batch.counts), probs.split(batch.counts), image_sizes,
                                      self.score_thresh_test, self.nms_thresh_test, self.detections_per_image)
        return self._finish_inference(feats, results), {}
