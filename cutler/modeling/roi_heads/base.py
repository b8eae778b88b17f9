"""What the standard and cascade ROI heads share: proposal labelling/sampling, pooling, the mask branch.

Proposals of all images travel together as one ``(R, 4)`` tensor plus an ``(R,)`` image index, so
pooling, heads, losses and DropLoss run once per batch; only matching and sampling (which Detectron2
defines per image, and which see a few thousand boxes) loop over the images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ...structures.boxes import pairwise_iou
from ..droploss import droploss_weights
from ..matcher import Matcher
from ..poolers import ROIPooler
from ..sampling import subsample_labels
from ..shape_spec import ShapeSpec
from .mask_head import MaskRCNNConvUpsampleHead, crop_and_resize_masks, mask_rcnn_inference, mask_rcnn_loss

__all__ = ["ProposalBatch", "ROIHeadsBase", "clip_boxes_per_image", "label_proposals"]

Target = Dict[str, Tensor]


@dataclass
class ProposalBatch:
    """Proposals of a batch, concatenated over images (all tensors share the first dimension R).

    boxes: ``(R, 4)`` XYXY float32 (detached); image_index: ``(R,)`` int64; counts: boxes per image.
    Training only: gt_classes ``(R,)`` int64 in [0, K] (K = background); gt_boxes ``(R, 4)`` the matched
    GT box (the proposal itself where its image has no GT); gt_index ``(R,)`` matched GT row within
    its image (0 where the image has no GT).
    """

    boxes: Tensor
    image_index: Tensor
    counts: List[int]
    gt_classes: Optional[Tensor] = None
    gt_boxes: Optional[Tensor] = None
    gt_index: Optional[Tensor] = None

    def rois(self) -> Tensor:
        """``(R, 5)`` ``(image_index, x0, y0, x1, y1)`` for the pooler."""
        return torch.cat([self.image_index[:, None].to(self.boxes.dtype), self.boxes], dim=1)

    def foreground(self, num_classes: int) -> Tensor:
        """``(R,)`` bool: labelled with a foreground class."""
        return (self.gt_classes >= 0) & (self.gt_classes < num_classes)


def _image_index(counts: Sequence[int], device: torch.device) -> Tensor:
    return torch.repeat_interleave(torch.arange(len(counts), device=device),
                                   torch.tensor(list(counts), device=device, dtype=torch.int64))


def _gt(target: Target, device: torch.device) -> Tuple[Tensor, Tensor]:
    """``((M, 4) float32 boxes, (M,) int64 classes)`` of one image's target on ``device``."""
    return (target["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4),
            target["classes"].to(device=device, dtype=torch.int64).reshape(-1))


def clip_boxes_per_image(boxes: Tensor, image_index: Tensor, image_sizes: Sequence[Tuple[int, int]]) -> Tensor:
    """Clip concatenated ``(R, 4)`` boxes, each to the ``(h, w)`` of its image (Detectron2's ``Boxes.clip``)."""
    hw = torch.tensor([[float(h), float(w)] for h, w in image_sizes], device=boxes.device, dtype=boxes.dtype)
    h = hw[image_index, 0]
    w = hw[image_index, 1]
    zero = torch.zeros((), device=boxes.device, dtype=boxes.dtype)
    return torch.stack([torch.minimum(boxes[:, 0].clamp(min=zero), w), torch.minimum(boxes[:, 1].clamp(min=zero), h),
                        torch.minimum(boxes[:, 2].clamp(min=zero), w), torch.minimum(boxes[:, 3].clamp(min=zero), h)],
                       dim=1)


def label_proposals(boxes: Tensor, gt_boxes: Tensor, gt_classes: Tensor, matcher: Matcher,
                    num_classes: int) -> Tuple[Tensor, Tensor]:
    """Match one image's ``(P, 4)`` boxes to its ``(M, 4)`` GT and label them (Detectron2 ROI heads).

    Returns ``(classes (P,), matched (P,))``: the matched GT's class where the matcher says 1,
    ``num_classes`` (background) where it says 0, -1 where it says -1; all background without GT.
    """
    matched, labels = matcher(pairwise_iou(gt_boxes, boxes))
    if gt_boxes.shape[0] == 0:
        return torch.full_like(matched, num_classes), matched
    classes = gt_classes[matched].clone()
    classes[labels == 0] = num_classes
    classes[labels == -1] = -1
    return classes, matched


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    """``x`` in the forward pass, gradient times ``scale`` in the backward pass."""
    return _ScaleGradient.apply(x, scale)


class ROIHeadsBase(nn.Module):
    """Shared machinery; subclasses implement the box branch.

    Args:
        in_features: feature names pooled by the heads ("p2".."p5"); strides: their strides.
        in_channels: channels of those features (equal across levels).
        num_classes: K foreground classes.
        batch_size_per_image, positive_fraction: stage-1 proposal sampling.
        proposal_append_gt: add the GT boxes to each image's proposals in training.
        iou_thresholds, iou_labels: the first (or only) stage's Matcher (Detectron2's ROI_HEADS.IOU_*).
        score_thresh_test, nms_thresh_test, detections_per_image: inference filtering.
        use_droploss, droploss_iou_thresh: DropLoss on the box classifiers.
        mask_on and mask_*: the mask branch.
    """

    def __init__(
        self, *, in_features: Sequence[str], strides: Sequence[int], in_channels: int, num_classes: int,
        box_pooler_resolution: int = 7, box_pooler_sampling_ratio: int = 0, box_pooler_type: str = "ROIAlignV2",
        batch_size_per_image: int = 512, positive_fraction: float = 0.25, proposal_append_gt: bool = True,
        iou_thresholds: Sequence[float] = (0.5,), iou_labels: Sequence[int] = (0, 1),
        score_thresh_test: float = 0.05, nms_thresh_test: float = 0.5, detections_per_image: int = 100,
        box_reg_loss_type: str = "smooth_l1", smooth_l1_beta: float = 0.0, box_reg_loss_weight: float = 1.0,
        use_droploss: bool = False, droploss_iou_thresh: float = 0.01,
        mask_on: bool = False, mask_pooler_resolution: int = 14, mask_pooler_sampling_ratio: int = 0,
        mask_pooler_type: str = "ROIAlignV2", mask_num_conv: int = 4, mask_conv_dim: int = 256,
        cls_agnostic_mask: bool = False, mask_norm: str = "",
    ):
        super().__init__()
        self.in_features = list(in_features)
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        scales = [1.0 / s for s in strides]
        self.box_pooler = ROIPooler(box_pooler_resolution, scales, box_pooler_sampling_ratio, box_pooler_type)
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.proposal_append_gt = bool(proposal_append_gt)
        self.proposal_matcher = Matcher(list(iou_thresholds), list(iou_labels), allow_low_quality_matches=False)
        self.score_thresh_test = float(score_thresh_test)
        self.nms_thresh_test = float(nms_thresh_test)
        self.detections_per_image = int(detections_per_image)
        self.box_reg_loss_type = box_reg_loss_type
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.box_reg_loss_weight = float(box_reg_loss_weight)
        self.use_droploss = bool(use_droploss)
        self.droploss_iou_thresh = float(droploss_iou_thresh)
        self.mask_on = bool(mask_on)
        if self.mask_on:
            self.mask_pooler = ROIPooler(mask_pooler_resolution, scales, mask_pooler_sampling_ratio, mask_pooler_type)
            self.mask_head = MaskRCNNConvUpsampleHead(in_channels, num_classes, mask_conv_dim, mask_num_conv,
                                                      cls_agnostic_mask, mask_norm)

    # ------------------------------------------------------------------------------------ labelling
    @torch.no_grad()
    def label_and_sample_proposals(self, proposals: Sequence[Tensor], targets: Sequence[Target]) -> ProposalBatch:
        """Stage-1 training proposals: append GT, match, sample ``batch_size_per_image`` per image."""
        out_boxes, out_classes, out_gt_boxes, out_gt_index, counts = [], [], [], [], []
        for props, target in zip(proposals, targets):
            gt_boxes, gt_classes = _gt(target, props.device)
            boxes = props.detach().to(torch.float32).reshape(-1, 4)
            if self.proposal_append_gt and gt_boxes.shape[0] > 0:
                boxes = torch.cat([boxes, gt_boxes], dim=0)
            classes, matched = label_proposals(boxes, gt_boxes, gt_classes, self.proposal_matcher, self.num_classes)
            fg, bg = subsample_labels(classes, self.batch_size_per_image, self.positive_fraction, self.num_classes)
            keep = torch.cat([fg, bg])
            out_boxes.append(boxes[keep])
            out_classes.append(classes[keep])
            out_gt_boxes.append(gt_boxes[matched[keep]] if gt_boxes.shape[0] > 0 else boxes[keep])
            out_gt_index.append(matched[keep])
            counts.append(int(keep.numel()))
        device = out_boxes[0].device
        return ProposalBatch(torch.cat(out_boxes), _image_index(counts, device), counts, torch.cat(out_classes),
                             torch.cat(out_gt_boxes), torch.cat(out_gt_index))

    @torch.no_grad()
    def match_boxes(self, boxes: Tensor, image_index: Tensor, counts: List[int], targets: Sequence[Target],
                    matcher: Matcher) -> ProposalBatch:
        """Label already-chosen boxes (no GT appended, no sampling): the cascade's later stages."""
        classes, gt_boxes, gt_index = [], [], []
        for boxes_i, target in zip(boxes.split(counts), targets):
            gt_b, gt_c = _gt(target, boxes.device)
            cls_i, matched = label_proposals(boxes_i, gt_b, gt_c, matcher, self.num_classes)
            classes.append(cls_i)
            gt_boxes.append(gt_b[matched] if gt_b.shape[0] > 0 else boxes_i)
            gt_index.append(matched)
        return ProposalBatch(boxes, image_index, counts, torch.cat(classes), torch.cat(gt_boxes), torch.cat(gt_index))

    @staticmethod
    def batch_proposals(proposals: Sequence[Tensor]) -> ProposalBatch:
        """Inference proposals as one :class:`ProposalBatch` (no labels)."""
        counts = [int(p.shape[0]) for p in proposals]
        boxes = torch.cat([p.detach().to(torch.float32).reshape(-1, 4) for p in proposals], dim=0)
        return ProposalBatch(boxes, _image_index(counts, boxes.device), counts)

    def drop_weights(self, pred_boxes: Tensor, batch: ProposalBatch, targets: Sequence[Target]) -> Optional[Tensor]:
        """DropLoss weights for a stage's predicted boxes, or None when DropLoss is off."""
        if not self.use_droploss:
            return None
        return droploss_weights(pred_boxes, batch.image_index, [t["boxes"] for t in targets], self.droploss_iou_thresh)

    # ----------------------------------------------------------------------------------- mask branch
    def _mask_loss(self, features: List[Tensor], batch: ProposalBatch, targets: Sequence[Target]) -> Tensor:
        """Mask loss on the foreground proposals of the (stage-1) sampled batch."""
        fg = batch.foreground(self.num_classes)
        idx = torch.nonzero(fg, as_tuple=True)[0]
        rois = batch.rois()[idx]
        logits = self.mask_head(self.mask_pooler(features, rois))
        size = logits.shape[-1]
        fg_image = batch.image_index[idx]
        fg_boxes = batch.boxes[idx]
        fg_gt = batch.gt_index[idx]
        # Per image (GT masks differ in size); the fg rows are already ordered by image.
        mask_targets = []
        for i, target in enumerate(targets):
            sel = fg_image == i
            if not bool(sel.any()):
                continue
            if "masks" not in target:
                raise KeyError("mask_on training needs targets[i]['masks'] ((M, H, W) bool)")
            mask_targets.append(crop_and_resize_masks(target["masks"], fg_gt[sel], fg_boxes[sel], size))
        if mask_targets:
            mask_targets_t = torch.cat(mask_targets).to(logits.device)
        else:
            mask_targets_t = torch.zeros((0, size, size), dtype=torch.bool, device=logits.device)
        return mask_rcnn_loss(logits, batch.gt_classes[idx], mask_targets_t)

    def _mask_inference(self, features: List[Tensor], results: List[Dict[str, Tensor]]) -> None:
        """Add ``mask_probs`` ``(N, M, M)`` to each image's detections, in place."""
        pred = self.batch_proposals([r["boxes"] for r in results])
        classes = torch.cat([r["classes"] for r in results]) if results else torch.zeros(0, dtype=torch.int64)
        logits = self.mask_head(self.mask_pooler(features, pred.rois()))
        probs = mask_rcnn_inference(logits, classes)
        for r, p in zip(results, probs.split(pred.counts)):
            r["mask_probs"] = p

    def _finish_inference(self, feats: List[Tensor], results: List[Dict[str, Tensor]]) -> List[Dict[str, Tensor]]:
        """Public per-image detections (boxes, scores, classes, and mask_probs with the mask branch)."""
        results = [{k: r[k] for k in ("boxes", "scores", "classes")} for r in results]
        if self.mask_on:
            self._mask_inference(feats, results)
        return results

    def _features(self, features: Dict[str, Tensor]) -> List[Tensor]:
        return [features[f] for f in self.in_features]


def input_shape_args(cfg, input_shape: Dict[str, ShapeSpec]) -> Dict[str, object]:
    """Constructor arguments of :class:`ROIHeadsBase` from the config and the backbone's shapes."""
    rh, bh, mh = cfg.model.roi_heads, cfg.model.roi_box_head, cfg.model.roi_mask_head
    # Refuse the Detectron2 options this implementation does not have rather than ignore them.
    if bh.name != "FastRCNNConvFCHead":
        raise ValueError(f"Unsupported model.roi_box_head.name {bh.name!r}; only FastRCNNConvFCHead")
    if cfg.model.mask_on and mh.name != "MaskRCNNConvUpsampleHead":
        raise ValueError(f"Unsupported model.roi_mask_head.name {mh.name!r}; only MaskRCNNConvUpsampleHead")
    for flag in ("use_sigmoid_ce", "use_fed_loss", "train_on_pred_boxes"):
        if bh[flag]:
            raise ValueError(f"model.roi_box_head.{flag}=true is not supported")
    in_features = list(rh.in_features)
    if not in_features or any(f not in input_shape for f in in_features):  # e.g. Detectron2's C4 ["res4"]
        raise ValueError(f"model.roi_heads.in_features {in_features} must be non-empty names of backbone "
                         f"outputs ({sorted(input_shape)})")
    channels = {input_shape[f].channels for f in in_features}
    if len(channels) != 1:
        raise ValueError(f"ROI heads need equal channels on {in_features}, got {sorted(channels)}")
    return dict(
        in_features=in_features, strides=[input_shape[f].stride for f in in_features], in_channels=channels.pop(),
        num_classes=rh.num_classes, box_pooler_resolution=bh.pooler_resolution,
        box_pooler_sampling_ratio=bh.pooler_sampling_ratio, box_pooler_type=bh.pooler_type,
        batch_size_per_image=rh.batch_size_per_image, positive_fraction=rh.positive_fraction,
        proposal_append_gt=rh.proposal_append_gt, iou_thresholds=list(rh.iou_thresholds),
        iou_labels=list(rh.iou_labels), score_thresh_test=rh.score_thresh_test, nms_thresh_test=rh.nms_thresh_test,
        detections_per_image=cfg.test.detections_per_image, box_reg_loss_type=bh.bbox_reg_loss_type,
        smooth_l1_beta=bh.smooth_l1_beta, box_reg_loss_weight=bh.bbox_reg_loss_weight,
        use_droploss=rh.use_droploss, droploss_iou_thresh=rh.droploss_iou_thresh, mask_on=cfg.model.mask_on,
        mask_pooler_resolution=mh.pooler_resolution, mask_pooler_sampling_ratio=mh.pooler_sampling_ratio,
        mask_pooler_type=mh.pooler_type, mask_num_conv=mh.num_conv, mask_conv_dim=mh.conv_dim,
        cls_agnostic_mask=mh.cls_agnostic_mask, mask_norm=mh.norm,
    )
