"""Feature Pyramid Network over a bottom-up backbone (Detectron2's ``FPN`` + ``LastLevelMaxPool``).

Keys: ``bottom_up.*`` (the ResNet), ``fpn_lateral{k}`` (1x1) and ``fpn_output{k}`` (3x3) for each
input level k = log2(stride); with a norm, the convs have no bias and a ``.norm`` child.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from ..layers import Conv2d, c2_xavier_fill, get_norm
from ..shape_spec import ShapeSpec
from .resnet import build_resnet_backbone


class LastLevelMaxPool(nn.Module):
    """Extra level P6 = max_pool2d(P5, kernel 1, stride 2): a stride-2 subsampling of P5."""

    num_levels = 1
    in_feature = "p5"

    def forward(self, x: Tensor) -> List[Tensor]:
        return [F.max_pool2d(x, kernel_size=1, stride=2, padding=0)]


class FPN(nn.Module):
    """Top-down pathway with lateral connections.

    Args:
        bottom_up: module returning ``Dict[str, Tensor]`` with an ``output_shape()`` method.
        in_features: bottom-up feature names in increasing stride (e.g. res2..res5).
        out_channels: channels of every output level.
        norm: Detectron2 norm name for lateral/output convs ("" = none, convs get a bias).
        top_block: optional module producing extra coarser levels from ``p{last}``.
        fuse_type: "sum" or "avg" of lateral and upsampled top-down features.
    """

    def __init__(self, bottom_up: nn.Module, in_features: Sequence[str], out_channels: int = 256, norm: str = "",
                 top_block: nn.Module | None = None, fuse_type: str = "sum"):
        super().__init__()
        if fuse_type not in ("sum", "avg"):
            raise ValueError(f"FPN fuse_type must be 'sum' or 'avg', got {fuse_type!r}")
        shapes = bottom_up.output_shape()
        if not in_features:  # e.g. Detectron2's default FPN.IN_FEATURES ([]) left in an imported YAML
            raise ValueError(f"FPN needs input features (model.fpn.in_features is empty; backbone gives {sorted(shapes)})")
        missing = [f for f in in_features if f not in shapes]
        if missing:
            raise ValueError(f"FPN in_features {missing} are not produced by the backbone ({sorted(shapes)})")
        strides = [shapes[f].stride for f in in_features]
        channels = [shapes[f].channels for f in in_features]
        for s0, s1 in zip(strides[:-1], strides[1:]):
            if s1 != 2 * s0:
                raise ValueError(f"FPN needs strides doubling level to level, got {strides}")
        self.bottom_up = bottom_up
        self.in_features = list(in_features)
        self.top_block = top_block
        self.fuse_type = fuse_type
        use_bias = norm == ""
        levels = []
        for stride, cin in zip(strides, channels):
            level = int(math.log2(stride))
            lat = Conv2d(cin, out_channels, kernel_size=1, bias=use_bias, norm=get_norm(norm, out_channels))
            out = Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=use_bias,
                         norm=get_norm(norm, out_channels))
            c2_xavier_fill(lat)
            c2_xavier_fill(out)
            self.add_module(f"fpn_lateral{level}", lat)
            self.add_module(f"fpn_output{level}", out)
            levels.append(level)
        # Top-down order (coarsest first); modules are looked up by name so that module copies
        # (DataParallel replicas, deepcopy) stay consistent and the names above are the only keys.
        self._levels_top_down = levels[::-1]
        self._out_feature_strides = {f"p{int(math.log2(s))}": s for s in strides}
        if top_block is not None:
            last = int(math.log2(strides[-1]))
            for k in range(1, top_block.num_levels + 1):
                self._out_feature_strides[f"p{last + k}"] = 2 ** (last + k)
        self._out_features = list(self._out_feature_strides)
        self._out_channels = out_channels
        self._size_divisibility = strides[-1]

    @property
    def size_divisibility(self) -> int:
        """Input height/width must be multiples of this (the coarsest bottom-up stride, 32)."""
        return self._size_divisibility

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """``x``: ``(N, 3, H, W)`` with H, W multiples of ``size_divisibility``.
        Returns ``{"p2": (N, 256, H/4, W/4), ..., "p6": (N, 256, H/64, W/64)}``."""
        bottom_up = self.bottom_up(x)
        feats = [bottom_up[f] for f in self.in_features[::-1]]
        lateral = [getattr(self, f"fpn_lateral{k}") for k in self._levels_top_down]
        output = [getattr(self, f"fpn_output{k}") for k in self._levels_top_down]
        prev = lateral[0](feats[0])
        results = [output[0](prev)]
        for feat, lat, out in zip(feats[1:], lateral[1:], output[1:]):
            top_down = F.interpolate(prev, scale_factor=2.0, mode="nearest")
            prev = lat(feat) + top_down
            if self.fuse_type == "avg":
                prev = prev / 2
            results.insert(0, out(prev))
        if self.top_block is not None:
            src = results[self._out_features.index(self.top_block.in_feature)]
            results.extend(self.top_block(src))
        return dict(zip(self._out_features, results))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {name: ShapeSpec(channels=self._out_channels, stride=s) for name, s in self._out_feature_strides.items()}


def build_resnet_fpn_backbone(cfg) -> FPN:
    """ResNet + FPN (+ P6 max-pool) from ``cfg.model.resnets``, ``cfg.model.fpn``."""
    bottom_up = build_resnet_backbone(cfg)
    return FPN(bottom_up, cfg.model.fpn.in_features, cfg.model.fpn.out_channels, cfg.model.fpn.norm,
               top_block=LastLevelMaxPool(), fuse_type=cfg.model.fpn.fuse_type)
