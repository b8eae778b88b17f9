"""Panoptic FPN: the two-stage detector plus a semantic branch on the same FPN (Detectron2's ``PanopticFPN``).

Training inputs are the detector's (see :mod:`cutler.modeling.meta_arch.rcnn`) plus ``"sem_seg"``: a
``(H, W)`` integer map at the resized image size (0 = "thing", 1..S = stuff classes, ``ignore_value`` =
void). The loss is ``lambda_i * (ROI-head losses) + RPN losses + lambda_s * L_sem`` with
``lambda_i = model.panoptic_fpn.instance_loss_weight`` applied to every ROI-head term (classification, box
regression and mask of every cascade stage; the RPN is not scaled, as in Detectron2) and
``lambda_s = model.sem_seg_head.loss_weight`` inside ``loss_sem_seg``.

Inference returns per image ``{"instances": ..., "sem_seg": (C, height, width) logits, "panoptic_seg":
(seg_map (height, width) int32, segments_info)}``, the panoptic map made by
:func:`combine_semantic_and_instance_outputs`.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn

from ..sem_seg_head import SemSegFPNHead, sem_seg_postprocess
from .rcnn import GeneralizedRCNN


def combine_semantic_and_instance_outputs(instances: Dict[str, Tensor], semantic: Tensor, overlap_threshold: float,
                                          stuff_area_thresh: int, instances_score_thresh: float
                                          ) -> Tuple[Tensor, List[Dict[str, Any]]]:
    """One panoptic map from instance and semantic predictions, by Panoptic FPN's rule.

    Instances are visited by decreasing score; the visit stops at the first score below
    ``instances_score_thresh``. An instance with an empty mask, or whose mask lies more than
    ``overlap_threshold`` (fraction of its area) on pixels already taken, is skipped; otherwise its not yet
    taken pixels become a new segment. Then every semantic class other than 0 (the "thing" class), in
    increasing order, claims its still-free pixels as one segment when they number at least
    ``stuff_area_thresh``. Segment ids are 1, 2, ... in that order; 0 is void.

    Args:
        instances: ``{"masks": (N, H, W) bool, "scores": (N,), "classes": (N,) int64}``.
        semantic: ``(H, W)`` int64 semantic class per pixel (argmax of the semantic logits).
        overlap_threshold, stuff_area_thresh, instances_score_thresh: see above.

    Returns:
        ``(seg_map (H, W) int32, segments_info)`` with, per segment, ``{"id", "isthing": True, "score",
        "category_id" (instance class), "instance_id" (index into the instances)}`` or ``{"id", "isthing":
        False, "category_id" (semantic class), "area"}``.
    """
    seg = torch.zeros(semantic.shape, dtype=torch.int32, device=semantic.device)
    taken = torch.zeros(semantic.shape, dtype=torch.bool, device=semantic.device)
    segments: List[Dict[str, Any]] = []
    scores = instances["scores"].float()
    order = torch.argsort(-scores, stable=True)
    masks = instances["masks"].to(device=semantic.device, dtype=torch.bool)
    areas = masks.flatten(1).sum(1).tolist() if len(masks) else []
    score_list, class_list = scores.tolist(), instances["classes"].tolist()
    for i in order.tolist():
        if score_list[i] < instances_score_thresh:
            break
        area = areas[i]
        if area == 0:
            continue
        mask = masks[i]
        overlap = int((mask & taken).sum())
        if overlap / area > overlap_threshold:
            continue
        if overlap:
            mask = mask & ~taken
        seg[mask] = len(segments) + 1
        taken |= mask
        segments.append({"id": len(segments) + 1, "isthing": True, "score": score_list[i],
                         "category_id": int(class_list[i]), "instance_id": int(i)})
    # Stuff: one pass over the free pixels counts every class at once.
    free = ~taken
    labels = semantic[free].long()
    if labels.numel():
        counts = torch.bincount(labels, minlength=int(labels.max()) + 1)
        lookup = torch.zeros_like(counts, dtype=torch.int32)
        for label in torch.nonzero(counts).flatten().tolist():
            if label == 0 or int(counts[label]) < stuff_area_thresh:
                continue
            lookup[label] = len(segments) + 1
            segments.append({"id": len(segments) + 1, "isthing": False, "category_id": int(label),
                             "area": int(counts[label])})
        seg[free] = lookup[labels]
    return seg, segments


class PanopticFPN(GeneralizedRCNN):
    """:class:`GeneralizedRCNN` + :class:`~cutler.modeling.sem_seg_head.SemSegFPNHead` (see the module docstring).

    Args:
        sem_seg_head: the semantic branch.
        instance_loss_weight: lambda_i.
        combine_overlap_thresh, combine_stuff_area_thresh, combine_instances_score_thresh: the panoptic
            combination (:func:`combine_semantic_and_instance_outputs`).
        **kwargs: :class:`GeneralizedRCNN`'s arguments (``mask_on`` must be True).
    """

    def __init__(self, *, sem_seg_head: SemSegFPNHead, instance_loss_weight: float = 1.0,
                 combine_overlap_thresh: float = 0.5, combine_stuff_area_thresh: int = 4096,
                 combine_instances_score_thresh: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if not self.mask_on:
            raise ValueError("PanopticFPN needs instance masks: set model.mask_on=true")
        self.sem_seg_head = sem_seg_head
        self.instance_loss_weight = float(instance_loss_weight)
        self.combine_overlap_thresh = float(combine_overlap_thresh)
        self.combine_stuff_area_thresh = int(combine_stuff_area_thresh)
        self.combine_instances_score_thresh = float(combine_instances_score_thresh)

    def _sem_seg_targets(self, batched_inputs: List[Dict[str, Any]], padded_hw: Tuple[int, int]) -> Tensor:
        """``(N, Hp, Wp)`` int64 semantic targets, padded with ``ignore_value`` like the images."""
        if any("sem_seg" not in d for d in batched_inputs):
            raise ValueError("PanopticFPN training inputs need a 'sem_seg' map per image (the dataset's images "
                             "need a 'sem_seg_file_name')")
        targets = torch.full((len(batched_inputs),) + tuple(padded_hw), self.sem_seg_head.ignore_value,
                             dtype=torch.int64, device=self.device)
        for i, d in enumerate(batched_inputs):
            sem = d["sem_seg"]
            if sem.shape[-2:] != d["image"].shape[-2:]:
                raise ValueError(f"'sem_seg' {tuple(sem.shape)} and 'image' {tuple(d['image'].shape)} differ in "
                                 f"size ({d.get('file_name', 'image ' + str(i))})")
            targets[i, : sem.shape[-2], : sem.shape[-1]] = sem.to(self.device, non_blocking=True)
        return targets

    def forward(self, batched_inputs: List[Dict[str, Any]]):
        """Losses (training) or per-image results (eval); see the module docstring."""
        if not self.training:
            return self.inference(batched_inputs)
        images, sizes = self.preprocess_image(batched_inputs)
        targets = self._targets(batched_inputs)
        sem_targets = self._sem_seg_targets(batched_inputs, tuple(images.shape[-2:]))
        with self._autocast():
            features = self.backbone(images)
            _, sem_losses = self.sem_seg_head(features, sem_targets)
            proposals, proposal_losses = self.proposal_generator(features, sizes, [t["boxes"] for t in targets])
            _, detector_losses = self.roi_heads(features, [p["boxes"] for p in proposals], sizes, targets)
        losses = dict(sem_losses)
        losses.update(proposal_losses)
        losses.update({k: v * self.instance_loss_weight for k, v in detector_losses.items()})
        return losses

    @torch.no_grad()
    def inference(self, batched_inputs: List[Dict[str, Any]], do_postprocess: bool = True):
        """Per image ``{"instances", "sem_seg", "panoptic_seg"}`` at each input's ``height`` x ``width``;
        without ``do_postprocess``, ``(raw ROI-head results, (N, C, Hp, Wp) semantic logits)``."""
        images, sizes = self.preprocess_image(batched_inputs)
        with self._autocast():
            features = self.backbone(images)
            sem_logits, _ = self.sem_seg_head(features)
            proposals, _ = self.proposal_generator(features, sizes, None)
            results, _ = self.roi_heads(features, [p["boxes"] for p in proposals], sizes, None)
        if not do_postprocess:
            return results, sem_logits
        outputs = []
        for result, logits, hw, d in zip(results, sem_logits, sizes, batched_inputs):
            out_hw = self._output_size(d)
            instances = self.postprocess(result, hw, out_hw)
            sem = sem_seg_postprocess(logits.float(), hw, out_hw)
            panoptic = combine_semantic_and_instance_outputs(
                instances, sem.argmax(dim=0), self.combine_overlap_thresh, self.combine_stuff_area_thresh,
                self.combine_instances_score_thresh)
            outputs.append({"instances": instances, "sem_seg": sem, "panoptic_seg": panoptic})
        return outputs


def build_panoptic_fpn(cfg, common: Dict[str, Any], backbone: nn.Module, rpn: nn.Module) -> PanopticFPN:
    """The Panoptic FPN of ``cfg`` around an already built backbone and RPN (``common``: the detector's
    normalisation / precision arguments)."""
    from ..roi_heads import build_roi_heads
    from ..sem_seg_head import build_sem_seg_head

    shapes = backbone.output_shape()
    p = cfg.model.panoptic_fpn
    return PanopticFPN(backbone=backbone, proposal_generator=rpn, roi_heads=build_roi_heads(cfg, shapes),
                       mask_on=bool(cfg.model.mask_on), sem_seg_head=build_sem_seg_head(cfg, shapes),
                       instance_loss_weight=float(p.instance_loss_weight),
                       combine_overlap_thresh=float(p.combine.overlap_thresh),
                       combine_stuff_area_thresh=int(p.combine.stuff_area_limit),
                       combine_instances_score_thresh=float(p.combine.instances_confidence_thresh), **common)


__all__ = ["PanopticFPN", "build_panoptic_fpn", "combine_semantic_and_instance_outputs"]
