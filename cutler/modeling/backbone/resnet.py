"""ResNet (basic blocks 18/34, bottlenecks 50/101/152) with Detectron2's module names and freezing semantics.

Module tree (so state-dict keys equal Detectron2's): ``stem.conv1`` (7x7/2 conv + ``.norm``),
``res2`` .. ``res5`` (``nn.Sequential`` of blocks), each block with ``conv1``/``conv2``/``conv3``
(+ ``.norm``) and, for the first block of a stage, ``shortcut`` (1x1 conv + ``.norm``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..layers import Conv2d, FrozenBatchNorm2d, c2_msra_fill, get_norm
from ..shape_spec import ShapeSpec

NUM_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}
BASIC_BLOCK_DEPTHS = (18, 34)


class _Freezable(nn.Module):
    """A module that can be frozen in place: no gradients, and BN turned into FrozenBN."""

    def freeze(self) -> "_Freezable":
        for p in self.parameters():
            p.requires_grad_(False)
        FrozenBatchNorm2d.convert_frozen_batchnorm(self)
        return self


class BasicStem(_Freezable):
    """conv 7x7/2 (bias-free) + norm + ReLU, then max-pool 3x3/2 pad 1: total stride 4."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: str = "BN"):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, 4
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=7, stride=2, padding=3, bias=False,
                            norm=get_norm(norm, out_channels))
        c2_msra_fill(self.conv1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BottleneckBlock(_Freezable):
    """1x1 -> 3x3 -> 1x1 bottleneck with a projection shortcut when channels change.

    ``stride_in_1x1=True`` puts the block's stride on the first 1x1 conv (MSRA/Caffe2 ResNets);
    ``False`` on the 3x3 conv (torchvision/DINO ResNets, "ResNet v1.5").
    """

    def __init__(self, in_channels: int, out_channels: int, *, bottleneck_channels: int, stride: int = 1,
                 num_groups: int = 1, norm: str = "BN", stride_in_1x1: bool = False, dilation: int = 1):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        if in_channels != out_channels:
            self.shortcut = Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False,
                                   norm=get_norm(norm, out_channels))
        else:
            self.shortcut = None
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv2d(in_channels, bottleneck_channels, kernel_size=1, stride=stride_1x1, bias=False,
                            norm=get_norm(norm, bottleneck_channels))
        self.conv2 = Conv2d(bottleneck_channels, bottleneck_channels, kernel_size=3, stride=stride_3x3,
                            padding=dilation, dilation=dilation, groups=num_groups, bias=False,
                            norm=get_norm(norm, bottleneck_channels))
        self.conv3 = Conv2d(bottleneck_channels, out_channels, kernel_size=1, bias=False,
                            norm=get_norm(norm, out_channels))
        for conv in (self.conv1, self.conv2, self.conv3, self.shortcut):
            if conv is not None:
                c2_msra_fill(conv)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return F.relu_(out + shortcut)


class BasicBlock(_Freezable):
    """Two 3x3 convs (stride on the first) with a projection shortcut when channels change: the
    block of ResNet-18/34 (Detectron2 names ``conv1``, ``conv2``, ``shortcut``)."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, norm: str = "BN"):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False,
                                   norm=get_norm(norm, out_channels))
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False,
                            norm=get_norm(norm, out_channels))
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False,
                            norm=get_norm(norm, out_channels))
        for conv in (self.conv1, self.conv2, self.shortcut):
            if conv is not None:
                c2_msra_fill(conv)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(F.relu_(self.conv1(x)))
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return F.relu_(out + shortcut)


class ResNet(nn.Module):
    """Stem + stages ``res2``..``res5``; returns the requested feature maps by name.

    Args:
        stem: the stem module (``stride`` and ``out_channels`` attributes).
        stages: list of lists of blocks, one list per stage starting at res2.
        out_features: names among "stem", "res2".."res5" to return.
        freeze_at: 0 = train everything; 1 = freeze the stem; k >= 2 = freeze stem and res2..res{k}.
    """

    def __init__(self, stem: BasicStem, stages: Sequence[Sequence[nn.Module]], out_features: Sequence[str],
                 freeze_at: int = 0):
        super().__init__()
        self.stem = stem
        self._out_feature_strides: Dict[str, int] = {"stem": stem.stride}
        self._out_feature_channels: Dict[str, int] = {"stem": stem.out_channels}
        self.stage_names: List[str] = []
        current_stride = stem.stride
        for i, blocks in enumerate(stages):
            name = f"res{i + 2}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            for block in blocks:
                current_stride *= block.stride
            self._out_feature_strides[name] = current_stride
            self._out_feature_channels[name] = blocks[-1].out_channels
        unknown = set(out_features) - set(self._out_feature_strides)
        if unknown:
            raise ValueError(f"ResNet out_features {sorted(unknown)} not among {sorted(self._out_feature_strides)}")
        self._out_features = list(out_features)
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int = 0) -> "ResNet":
        """Freeze the stem (``freeze_at >= 1``) and stages res2..res{freeze_at}: parameters stop
        requiring gradients and their BatchNorms become FrozenBatchNorm2d."""
        if freeze_at >= 1:
            self.stem.freeze()
        for idx, name in enumerate(self.stage_names, start=2):
            if freeze_at >= idx:
                for block in getattr(self, name).children():
                    block.freeze()
        return self

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """``x``: ``(N, 3, H, W)`` normalised images; returns ``{name: (N, C, H/stride, W/stride)}``."""
        if x.dim() != 4:
            raise ValueError(f"ResNet takes (N, C, H, W) input, got shape {tuple(x.shape)}")
        outputs = {}
        x = self.stem(x)
        if "stem" in self._out_features:
            outputs["stem"] = x
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
                for name in self._out_features}


def build_resnet_backbone(cfg, in_channels: int = 3) -> ResNet:
    """ResNet from ``cfg.model.resnets`` and ``cfg.model.backbone.freeze_at`` (Detectron2's rules:
    stage k doubles channels, stride 2 on the first block of res3..res5, res5 stride 1 when
    dilated)."""
    r = cfg.model.resnets
    depth = int(r.depth)
    if depth not in NUM_BLOCKS:
        raise ValueError(f"model.resnets.depth={depth} is not supported; choose one of {sorted(NUM_BLOCKS)}")
    if depth in BASIC_BLOCK_DEPTHS and (r.res5_dilation != 1 or r.num_groups != 1):
        raise ValueError(f"ResNet-{depth} (basic blocks) supports neither res5_dilation nor num_groups > 1")
    if r.res5_dilation not in (1, 2):
        raise ValueError(f"model.resnets.res5_dilation must be 1 or 2, got {r.res5_dilation}")
    norm = r.norm
    stem = BasicStem(in_channels, r.stem_out_channels, norm)
    out_features = list(r.out_features)
    stage_index = {"res2": 2, "res3": 3, "res4": 4, "res5": 5}
    max_stage = max(stage_index.get(f, 1) for f in out_features)
    bottleneck = r.num_groups * r.width_per_group
    cin, cout = r.stem_out_channels, r.res2_out_channels
    stages = []
    for idx, stage in enumerate(range(2, max_stage + 1)):
        dilation = r.res5_dilation if stage == 5 else 1
        first_stride = 1 if idx == 0 or (stage == 5 and dilation == 2) else 2
        blocks = []
        for b in range(NUM_BLOCKS[depth][idx]):
            if depth in BASIC_BLOCK_DEPTHS:
                blocks.append(BasicBlock(cin if b == 0 else cout, cout, stride=first_stride if b == 0 else 1,
                                         norm=norm))
                continue
            blocks.append(BottleneckBlock(cin if b == 0 else cout, cout, bottleneck_channels=bottleneck,
                                          stride=first_stride if b == 0 else 1, num_groups=r.num_groups,
                                          norm=norm, stride_in_1x1=r.stride_in_1x1, dilation=dilation))
        stages.append(blocks)
        cin, cout, bottleneck = cout, cout * 2, bottleneck * 2
    return ResNet(stem, stages, out_features, freeze_at=int(cfg.model.backbone.freeze_at))
