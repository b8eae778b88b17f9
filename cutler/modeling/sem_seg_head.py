"""The semantic-segmentation branch of Panoptic FPN (Detectron2's ``SemSegFPNHead``).

Every FPN level in ``in_features`` goes through a tower of 3x3 conv (+ GroupNorm) + ReLU blocks, each
followed by a x2 bilinear upsampling, until it reaches ``common_stride``; the towers are summed and a
1x1 conv predicts ``num_classes`` logits at ``common_stride``, upsampled x``common_stride`` for the loss
and at inference.

Keys are Detectron2's, so its Panoptic FPN checkpoints load: ``sem_seg_head.p2.0.weight``,
``sem_seg_head.p2.0.norm.{weight,bias}``, ``sem_seg_head.p4.2.weight`` (the upsampling layers hold no
parameters but keep their slot in each tower's ``nn.Sequential``), ``sem_seg_head.predictor.{weight,bias}``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

from torch import Tensor, nn
from torch.nn import functional as F

from .layers import Conv2d, c2_msra_fill, get_norm
from .shape_spec import ShapeSpec


class SemSegFPNHead(nn.Module):
    """Per-pixel class logits from FPN features.

    Args:
        input_shape: the backbone's ``{name: ShapeSpec}``.
        in_features: FPN levels used (e.g. ``p2..p5``), their strides >= ``common_stride``.
        num_classes: output classes (Panoptic FPN: stuff classes + 1 "thing" class at index 0).
        conv_dims: channels of the tower convolutions.
        common_stride: stride the towers meet at (4 = P2's).
        norm: Detectron2 norm name of the tower convolutions ("GN", "" ...).
        ignore_value: target value that contributes no loss.
        loss_weight: multiplies the cross-entropy (lambda_s).
    """

    def __init__(self, input_shape: Dict[str, ShapeSpec], in_features: Sequence[str], num_classes: int,
                 conv_dims: int = 128, common_stride: int = 4, norm: str = "GN", ignore_value: int = 255,
                 loss_weight: float = 1.0):
        super().__init__()
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ValueError(f"model.sem_seg_head.in_features {missing} are not produced by the backbone "
                             f"({sorted(input_shape)})")
        if num_classes < 1:
            raise ValueError(f"model.sem_seg_head.num_classes must be >= 1, got {num_classes}")
        self.in_features = list(in_features)
        self.common_stride = int(common_stride)
        self.ignore_value = int(ignore_value)
        self.loss_weight = float(loss_weight)
        self.num_classes = int(num_classes)
        for name in self.in_features:
            stride = input_shape[name].stride
            if stride < self.common_stride:
                raise ValueError(f"feature {name} has stride {stride} < model.sem_seg_head.common_stride "
                                 f"{self.common_stride}")
            length = max(1, int(math.log2(stride) - math.log2(self.common_stride)))
            ops = []
            for k in range(length):
                conv = Conv2d(input_shape[name].channels if k == 0 else conv_dims, conv_dims, kernel_size=3,
                              padding=1, bias=not norm, norm=get_norm(norm, conv_dims), activation=F.relu)
                c2_msra_fill(conv)
                ops.append(conv)
                if stride != self.common_stride:
                    ops.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.add_module(name, nn.Sequential(*ops))
        self.predictor = Conv2d(conv_dims, num_classes, kernel_size=1)
        c2_msra_fill(self.predictor)

    def layers(self, features: Dict[str, Tensor]) -> Tensor:
        """``(N, num_classes, H / common_stride, W / common_stride)`` logits from ``features``."""
        x = None
        for name in self.in_features:
            y = getattr(self, name)(features[name])
            x = y if x is None else x + y
        return self.predictor(x)

    def forward(self, features: Dict[str, Tensor], targets: Optional[Tensor] = None
                ) -> Tuple[Optional[Tensor], Dict[str, Tensor]]:
        """Training (``targets`` given): ``(None, {"loss_sem_seg": scalar})`` with ``targets`` ``(N, Hp, Wp)``
        int64 class ids at the padded input size (``ignore_value`` where unlabeled). Inference:
        ``((N, num_classes, Hp, Wp) float32 logits, {})``."""
        logits = self.layers(features)
        logits = F.interpolate(logits.float(), scale_factor=self.common_stride, mode="bilinear", align_corners=False)
        if targets is None:
            return logits, {}
        return None, {"loss_sem_seg": self.loss(logits, targets)}

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean per-pixel cross-entropy over non-ignored pixels, times ``loss_weight``; a batch without any
        labeled pixel gives 0 (not the NaN of an empty mean)."""
        if tuple(logits.shape[-2:]) != tuple(targets.shape[-2:]):
            raise ValueError(f"semantic logits {tuple(logits.shape[-2:])} and targets {tuple(targets.shape[-2:])} "
                             "differ in size")
        if not bool((targets != self.ignore_value).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits, targets.long(), reduction="mean", ignore_index=self.ignore_value) * self.loss_weight


def build_sem_seg_head(cfg, input_shape: Dict[str, ShapeSpec]) -> SemSegFPNHead:
    """The head described by ``cfg.model.sem_seg_head``."""
    h = cfg.model.sem_seg_head
    if h.name != "SemSegFPNHead":
        raise ValueError(f"model.sem_seg_head.name={h.name!r}: only 'SemSegFPNHead' is implemented")
    return SemSegFPNHead(input_shape, list(h.in_features), int(h.num_classes), int(h.convs_dim), int(h.common_stride),
                         str(h.norm), int(h.ignore_value), float(h.loss_weight))


def sem_seg_postprocess(logits: Tensor, image_size: Tuple[int, int], output_size: Tuple[int, int]) -> Tensor:
    """Logits ``(C, Hp, Wp)`` of a padded batch -> ``(C, out_h, out_w)``: crop to the image's unpadded
    ``image_size`` and resize bilinearly to the original ``output_size``."""
    cropped = logits[:, : image_size[0], : image_size[1]]
    return F.interpolate(cropped[None], size=tuple(output_size), mode="bilinear", align_corners=False)[0]


__all__ = ["SemSegFPNHead", "build_sem_seg_head", "sem_seg_postprocess"]
