"""Anchors in Detectron2's ``DefaultAnchorGenerator`` convention.

Cell anchors of a level are centred at (0, 0): for each size s, for each aspect ratio a (= h/w),
``w = sqrt(s^2 / a)``, ``h = a * w``, box ``(-w/2, -h/2, w/2, h/2)``. They are shifted to every
location ``(stride * (j + offset), stride * (i + offset))`` of the ``H x W`` grid, row-major (y outer,
x inner), and the anchors of one location are contiguous: anchor index =
``(i * W + j) * A + (size_index * num_ratios + ratio_index)``.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import Tensor, nn


def _broadcast(params, num_levels: int, name: str) -> List[List[float]]:
    """One list per level: a flat list or a single inner list is shared by every level."""
    if not isinstance(params, Sequence) or len(params) == 0:
        raise ValueError(f"anchor generator {name} must be a non-empty list, got {params!r}")
    if not isinstance(params[0], Sequence):
        return [list(params)] * num_levels
    if len(params) == 1:
        return [list(params[0])] * num_levels
    if len(params) != num_levels:
        raise ValueError(f"anchor generator has {len(params)} {name} lists for {num_levels} feature levels")
    return [list(p) for p in params]


def generate_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """``(len(sizes) * len(aspect_ratios), 4)`` XYXY anchors centred at 0, sizes outer, ratios inner."""
    anchors = []
    for size in sizes:
        area = float(size) ** 2.0
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


def grid_offsets(grid_hw: Sequence[int], stride: int, offset: float, device: torch.device):
    """Flattened ``(H*W,)`` x and y shifts of every cell, row-major; float32 like Detectron2."""
    h, w = int(grid_hw[0]), int(grid_hw[1])
    shifts_x = torch.arange(offset * stride, w * stride, step=stride, dtype=torch.float32, device=device)
    shifts_y = torch.arange(offset * stride, h * stride, step=stride, dtype=torch.float32, device=device)
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    return shift_x.reshape(-1), shift_y.reshape(-1)


class DefaultAnchorGenerator(nn.Module):
    """Anchors for a list of feature maps (one stride per map).

    Args:
        sizes: per level list of sizes (sqrt of area, input pixels), or one list for all levels.
        aspect_ratios: per level list of h/w ratios, or one list for all levels.
        strides: stride of each feature map.
        offset: relative position of the first anchor centre in a cell, in [0, 1).
    """

    box_dim = 4

    def __init__(self, sizes, aspect_ratios, strides: Sequence[int], offset: float = 0.0):
        super().__init__()
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"anchor offset must be in [0, 1), got {offset}")
        self.strides = [int(s) for s in strides]
        self.offset = float(offset)
        sizes = _broadcast(sizes, len(self.strides), "sizes")
        ratios = _broadcast(aspect_ratios, len(self.strides), "aspect_ratios")
        # Non-persistent buffers: they follow .to(device) but are not checkpoint keys (as in Detectron2).
        for i, (s, r) in enumerate(zip(sizes, ratios)):
            self.register_buffer(f"cell_anchors_{i}", generate_cell_anchors(s, r), persistent=False)
        self.num_anchors_per_level = [len(s) * len(r) for s, r in zip(sizes, ratios)]

    @property
    def num_anchors(self) -> List[int]:
        """Anchors per location for each level."""
        return list(self.num_anchors_per_level)

    def cell_anchors(self, level: int) -> Tensor:
        return getattr(self, f"cell_anchors_{level}")

    def forward(self, features: List[Tensor]) -> List[Tensor]:
        """Anchors for feature maps ``(N, C, Hi, Wi)``: a list of ``(Hi * Wi * A_i, 4)`` XYXY tensors
        in input-image pixels (the same for every image of the batch)."""
        if len(features) != len(self.strides):
            raise ValueError(f"anchor generator built for {len(self.strides)} levels got {len(features)} feature maps")
        anchors = []
        for level, (feat, stride) in enumerate(zip(features, self.strides)):
            base = self.cell_anchors(level)
            sx, sy = grid_offsets(feat.shape[-2:], stride, self.offset, base.device)
            shifts = torch.stack((sx, sy, sx, sy), dim=1)
            anchors.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        return anchors


def build_anchor_generator(cfg, input_shapes) -> DefaultAnchorGenerator:
    """Anchor generator from ``cfg.model.anchor_generator`` for the given ``ShapeSpec`` list."""
    a = cfg.model.anchor_generator
    if a.name != "DefaultAnchorGenerator":
        raise ValueError(f"model.anchor_generator.name={a.name!r} is not available (only DefaultAnchorGenerator)")
    return DefaultAnchorGenerator(list(a.sizes), list(a.aspect_ratios), [s.stride for s in input_shapes], a.offset)
