"""Region Proposal Network with Detectron2's ``RPN``/``StandardRPNHead`` semantics.

Layouts: per level, the head gives objectness ``(N, A, Hi, Wi)`` and deltas ``(N, 4A, Hi, Wi)``
(anchor a's deltas on channels 4a..4a+3). They are flattened to ``(N, Hi*Wi*A)`` and
``(N, Hi*Wi*A, 4)`` in the anchor generator's order (location-major, then cell anchor).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import batched_nms, generalized_box_iou_loss

from ...structures.boxes import clip_boxes, nonempty_boxes, pairwise_iou
from ..anchor_generator import DefaultAnchorGenerator, build_anchor_generator
from ..box_coding import Box2BoxTransform
from ..layers import Conv2d
from ..matcher import Matcher
from ..sampling import subsample_labels
from ..shape_spec import ShapeSpec


def flatten_predictions(logits: List[Tensor], deltas: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
    """Per level ``(N, A, Hi, Wi)`` logits -> ``(N, Hi*Wi*A)`` and ``(N, 4A, Hi, Wi)`` deltas ->
    ``(N, Hi*Wi*A, 4)``, matching the anchor generator's order (location-major, then cell anchor)."""
    flat_logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
    flat_deltas = [x.view(x.shape[0], -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2)
                   for x in deltas]
    return flat_logits, flat_deltas


class StandardRPNHead(nn.Module):
    """Shared 3x3 conv + ReLU, then 1x1 convs for A objectness logits and 4A box deltas per location.

    Keys: ``conv.{weight,bias}``, ``objectness_logits.{weight,bias}``, ``anchor_deltas.{weight,bias}``
    (with several ``conv_dims``: ``conv.conv0``, ``conv.conv1``, ...). All convs ~ N(0, 0.01), bias 0.
    """

    def __init__(self, in_channels: int, num_anchors: int, box_dim: int = 4, conv_dims: Sequence[int] = (-1,)):
        super().__init__()
        dims = [in_channels if d == -1 else int(d) for d in conv_dims]
        if len(dims) == 1:
            self.conv = Conv2d(in_channels, dims[0], kernel_size=3, padding=1, activation=nn.ReLU())
        else:
            self.conv = nn.Sequential()
            cin = in_channels
            for k, d in enumerate(dims):
                self.conv.add_module(f"conv{k}", Conv2d(cin, d, kernel_size=3, padding=1, activation=nn.ReLU()))
                cin = d
        self.objectness_logits = nn.Conv2d(dims[-1], num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(dims[-1], num_anchors * box_dim, kernel_size=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Per level ``(N, C, Hi, Wi)`` -> objectness ``(N, A, Hi, Wi)`` and deltas ``(N, 4A, Hi, Wi)``."""
        logits, deltas = [], []
        for x in features:
            t = self.conv(x)
            logits.append(self.objectness_logits(t))
            deltas.append(self.anchor_deltas(t))
        return logits, deltas


def find_top_rpn_proposals(proposals: List[Tensor], logits: List[Tensor], image_sizes: List[Tuple[int, int]],
                           nms_thresh: float, pre_nms_topk: int, post_nms_topk: int, min_box_size: float,
                           training: bool) -> List[Dict[str, Tensor]]:
    """Detectron2's proposal selection.

    Args:
        proposals: per level ``(N, Ri, 4)`` decoded boxes (Ri = the level's candidates).
        logits: per level ``(N, Ri)`` objectness logits, aligned with ``proposals``.
        image_sizes: ``(h, w)`` of each image before padding (boxes are clipped to it).
        pre_nms_topk: candidates kept PER LEVEL per image (top logits, one batched topk per level).
        post_nms_topk: proposals kept per image after NMS (sorted by logit, all levels together).
        min_box_size: boxes whose width or height is <= this are removed after clipping.

    NMS runs per image and per level (``batched_nms`` with level ids), as in Detectron2.

    Returns:
        per image ``{"boxes": (K, 4), "objectness_logits": (K,)}``, K <= post_nms_topk.
    """
    num_images = len(image_sizes)
    device = proposals[0].device
    batch_idx = torch.arange(num_images, device=device)[:, None]
    top_boxes, top_scores, level_ids = [], [], []
    for level, (boxes_l, logits_l) in enumerate(zip(proposals, logits)):
        k = min(logits_l.shape[1], pre_nms_topk)
        scores_l, idx = logits_l.topk(k, dim=1)
        top_boxes.append(boxes_l[batch_idx, idx])
        top_scores.append(scores_l)
        level_ids.append(torch.full((k,), level, dtype=torch.int64, device=device))
    boxes_all = torch.cat(top_boxes, dim=1)
    scores_all = torch.cat(top_scores, dim=1)
    levels = torch.cat(level_ids)
    results = []
    for n, image_hw in enumerate(image_sizes):
        boxes, scores, lvl = boxes_all[n], scores_all[n], levels
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        if not bool(valid.all()):
            if training:
                raise FloatingPointError("RPN predicted non-finite boxes or scores: training has diverged")
            boxes, scores, lvl = boxes[valid], scores[valid], lvl[valid]
        boxes = clip_boxes(boxes, image_hw)
        keep = nonempty_boxes(boxes, threshold=min_box_size)
        boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
        keep = batched_nms(boxes.float(), scores.float(), lvl, nms_thresh)[:post_nms_topk]
        results.append({"boxes": boxes[keep], "objectness_logits": scores[keep]})
    return results


class RPN(nn.Module):
    """Region proposal network: head, anchors, training targets/losses and proposal selection.

    Args:
        in_features: feature names used (e.g. p2..p6), in increasing stride.
        head: the ``StandardRPNHead``.
        anchor_generator: anchors for the same levels.
        matcher: anchor <-> ground-truth matcher (IoU bands, low-quality matches allowed).
        box2box_transform: anchor delta coding.
        batch_size_per_image, positive_fraction: anchor sampling for the losses.
        pre_nms_topk, post_nms_topk: ``(train, test)`` pairs.
        loss_weight: ``{"loss_rpn_cls": w, "loss_rpn_loc": w}``.
    """

    def __init__(self, *, in_features: Sequence[str], head: StandardRPNHead, anchor_generator: DefaultAnchorGenerator,
                 matcher: Matcher, box2box_transform: Box2BoxTransform, batch_size_per_image: int = 256,
                 positive_fraction: float = 0.5, pre_nms_topk: Tuple[int, int] = (2000, 1000),
                 post_nms_topk: Tuple[int, int] = (1000, 1000), nms_thresh: float = 0.7, min_box_size: float = 0.0,
                 loss_weight: Optional[Dict[str, float]] = None, box_reg_loss_type: str = "smooth_l1",
                 smooth_l1_beta: float = 0.0):
        super().__init__()
        if box_reg_loss_type not in ("smooth_l1", "giou"):
            raise ValueError(f"RPN box loss {box_reg_loss_type!r} is not available; use 'smooth_l1' or 'giou'")
        self.in_features = list(in_features)
        self.rpn_head = head
        self.anchor_generator = anchor_generator
        self.anchor_matcher = matcher
        self.box2box_transform = box2box_transform
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)
        self.pre_nms_topk = {True: int(pre_nms_topk[0]), False: int(pre_nms_topk[1])}
        self.post_nms_topk = {True: int(post_nms_topk[0]), False: int(post_nms_topk[1])}
        self.nms_thresh = float(nms_thresh)
        self.min_box_size = float(min_box_size)
        self.loss_weight = dict(loss_weight or {"loss_rpn_cls": 1.0, "loss_rpn_loc": 1.0})
        self.box_reg_loss_type = box_reg_loss_type
        self.smooth_l1_beta = float(smooth_l1_beta)

    @torch.no_grad()
    def label_and_sample_anchors(self, anchors: Tensor, gt_boxes: List[Tensor]) -> Tuple[Tensor, Tensor]:
        """Targets for ``(R, 4)`` anchors (all levels concatenated) and per-image ``(Mi, 4)`` GT boxes.

        Returns:
            labels: ``(N, R)`` int8: 1 sampled foreground, 0 sampled background, -1 ignored.
            matched_boxes: ``(N, R, 4)`` the matched GT box of every anchor (zeros without GT).
        """
        labels, matched = [], []
        for boxes in gt_boxes:
            boxes = boxes.to(anchors.dtype)
            iou = pairwise_iou(boxes, anchors)
            idx, lab = self.anchor_matcher(iou)
            lab = lab.to(torch.int8)
            pos, neg = subsample_labels(lab, self.batch_size_per_image, self.positive_fraction, 0)
            lab = torch.full_like(lab, -1)
            lab[pos] = 1
            lab[neg] = 0
            labels.append(lab)
            matched.append(boxes[idx] if boxes.numel() else torch.zeros_like(anchors))
        return torch.stack(labels), torch.stack(matched)

    def losses(self, anchors: Tensor, pred_logits: Tensor, pred_deltas: Tensor, gt_labels: Tensor,
               gt_boxes: Tensor) -> Dict[str, Tensor]:
        """Objectness BCE over sampled anchors and box loss over sampled foreground anchors, both SUMMED
        and divided by ``batch_size_per_image * num_images`` (Detectron2's normaliser, independent of
        how many anchors were actually sampled).

        Shapes: anchors ``(R, 4)``, pred_logits ``(N, R)``, pred_deltas ``(N, R, 4)``, gt_labels
        ``(N, R)``, gt_boxes ``(N, R, 4)``.
        """
        num_images = gt_labels.shape[0]
        fg = gt_labels == 1
        n_idx, r_idx = fg.nonzero(as_tuple=True)
        fg_anchors = anchors[r_idx]
        fg_deltas = pred_deltas[n_idx, r_idx].float()
        if self.box_reg_loss_type == "smooth_l1":
            target = self.box2box_transform.get_deltas(fg_anchors, gt_boxes[n_idx, r_idx])
            if self.smooth_l1_beta < 1e-5:
                loss_loc = (fg_deltas - target).abs().sum()
            else:
                loss_loc = F.smooth_l1_loss(fg_deltas, target, beta=self.smooth_l1_beta, reduction="sum")
        else:
            pred_boxes = self.box2box_transform.apply_deltas(fg_deltas, fg_anchors)
            loss_loc = generalized_box_iou_loss(pred_boxes, gt_boxes[n_idx, r_idx], reduction="sum")
        valid = gt_labels >= 0
        loss_cls = F.binary_cross_entropy_with_logits(pred_logits[valid].float(), gt_labels[valid].float(),
                                                      reduction="sum")
        normalizer = self.batch_size_per_image * num_images
        return {"loss_rpn_cls": loss_cls / normalizer * self.loss_weight.get("loss_rpn_cls", 1.0),
                "loss_rpn_loc": loss_loc / normalizer * self.loss_weight.get("loss_rpn_loc", 1.0)}

    def forward(self, features: Dict[str, Tensor], image_sizes: List[Tuple[int, int]],
                gt_boxes: Optional[List[Tensor]] = None) -> Tuple[List[Dict[str, Tensor]], Dict[str, Tensor]]:
        """Proposals (and losses when training).

        Args:
            features: ``{name: (N, C, Hi, Wi)}`` containing ``in_features``.
            image_sizes: ``(h, w)`` of each image before padding.
            gt_boxes: training only: per image ``(Mi, 4)`` XYXY ground-truth boxes in input pixels.

        Returns:
            per image ``{"boxes": (K, 4) XYXY, "objectness_logits": (K,)}`` (detached) and a loss dict
            (``loss_rpn_cls``, ``loss_rpn_loc``; empty in eval mode).
        """
        feats = [features[f] for f in self.in_features]
        anchors = self.anchor_generator(feats)
        logits, deltas = flatten_predictions(*self.rpn_head(feats))
        losses: Dict[str, Tensor] = {}
        if self.training:
            if gt_boxes is None:
                raise ValueError("RPN in training mode needs gt_boxes")
            all_anchors = torch.cat(anchors)
            labels, matched = self.label_and_sample_anchors(all_anchors, gt_boxes)
            losses = self.losses(all_anchors, torch.cat(logits, dim=1), torch.cat(deltas, dim=1), labels, matched)
        proposals = self.predict_proposals(anchors, logits, deltas, image_sizes)
        return proposals, losses

    @torch.no_grad()
    def predict_proposals(self, anchors: List[Tensor], logits: List[Tensor], deltas: List[Tensor],
                          image_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """Top-k per level, decode, clip, drop empty, NMS, top-k per image. Proposals are treated as
        constants for the ROI heads (no gradient through box coordinates), as in Detectron2.

        Only the top-k candidates of each level are decoded: decoding is per anchor, so the boxes are
        identical to decoding everything first, at a fraction of the cost.
        """
        k = self.pre_nms_topk[self.training]
        boxes_per_level, logits_per_level = [], []
        for anchors_l, logits_l, deltas_l in zip(anchors, logits, deltas):
            n, r = logits_l.shape
            kk = min(r, k)
            top_logits, idx = logits_l.topk(kk, dim=1)
            sel_deltas = torch.gather(deltas_l, 1, idx[..., None].expand(n, kk, 4))
            boxes = self.box2box_transform.apply_deltas(sel_deltas.reshape(-1, 4), anchors_l[idx.reshape(-1)])
            boxes_per_level.append(boxes.view(n, kk, 4))
            logits_per_level.append(top_logits)
        return find_top_rpn_proposals(boxes_per_level, logits_per_level, image_sizes, self.nms_thresh,
                                      pre_nms_topk=k, post_nms_topk=self.post_nms_topk[self.training],
                                      min_box_size=self.min_box_size, training=self.training)


def build_rpn(cfg, input_shape: Dict[str, ShapeSpec]) -> RPN:
    """RPN from ``cfg.model.rpn`` and ``cfg.model.anchor_generator`` over the backbone's output shapes."""
    r = cfg.model.rpn
    if r.head_name != "StandardRPNHead":
        raise ValueError(f"model.rpn.head_name={r.head_name!r} is not available (only StandardRPNHead)")
    missing = [f for f in r.in_features if f not in input_shape]
    if missing or not r.in_features:  # e.g. Detectron2's C4 default ["res4"] under an FPN backbone
        raise ValueError(f"model.rpn.in_features {list(r.in_features)} must be non-empty names of backbone "
                         f"outputs ({sorted(input_shape)})")
    shapes = [input_shape[f] for f in r.in_features]
    channels = {s.channels for s in shapes}
    if len(channels) != 1:
        raise ValueError(f"RPN needs the same channel count on every input level, got {channels}")
    anchor_generator = build_anchor_generator(cfg, shapes)
    num_anchors = set(anchor_generator.num_anchors)
    if len(num_anchors) != 1:
        raise ValueError(f"RPN head needs the same number of anchors per location on every level, got {num_anchors}")
    head = StandardRPNHead(channels.pop(), num_anchors.pop(), 4, list(r.conv_dims))
    return RPN(in_features=r.in_features, head=head, anchor_generator=anchor_generator,
               matcher=Matcher(r.iou_thresholds, r.iou_labels, allow_low_quality_matches=True),
               box2box_transform=Box2BoxTransform(r.bbox_reg_weights), batch_size_per_image=r.batch_size_per_image,
               positive_fraction=r.positive_fraction, pre_nms_topk=(r.pre_nms_topk_train, r.pre_nms_topk_test),
               post_nms_topk=(r.post_nms_topk_train, r.post_nms_topk_test), nms_thresh=r.nms_thresh,
               min_box_size=0.0,
               loss_weight={"loss_rpn_cls": r.loss_weight, "loss_rpn_loc": r.bbox_reg_loss_weight * r.loss_weight},
               box_reg_loss_type=r.bbox_reg_loss_type, smooth_l1_beta=r.smooth_l1_beta)
