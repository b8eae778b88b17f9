"""Multi-level ROIAlign pooling over an FPN (Detectron2's ``ROIPooler`` conventions).

Each box is pooled from ONE pyramid level chosen by its size: a box of ``canonical_box_size`` (224)
pixels on a side goes to ``canonical_level`` (4, i.e. p4), twice as large one level up, half as large
one level down, clamped to the levels that exist. Pooling uses ``torchvision.ops.roi_align`` with
``aligned=True`` for Detectron2's "ROIAlignV2" (pixel centres at +0.5, the convention all CutLER
checkpoints were trained with) and ``aligned=False`` for the legacy "ROIAlign".
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

__all__ = ["ROIPooler", "assign_boxes_to_levels", "boxes_to_rois"]


def assign_boxes_to_levels(
    boxes: Tensor, min_level: int, max_level: int, canonical_box_size: float = 224.0, canonical_level: int = 4
) -> Tensor:
    """Pyramid level of each box, relative to ``min_level``.

    ``level = floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8))`` clamped to
    ``[min_level, max_level]`` (the 1e-8 keeps zero-area boxes finite; they land on ``min_level``).

    Args:
        boxes: ``(R, 4)`` XYXY boxes in input-image pixels.
    Returns:
        ``(R,)`` int64 in ``[0, max_level - min_level]`` (index into the list of feature maps).
    """
    sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_box_size + 1e-8))
    levels = torch.clamp(levels, min=min_level, max=max_level)
    return levels.to(torch.int64) - min_level


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Concatenate per-image ``(Ri, 4)`` boxes into ``(sum Ri, 5)`` rois ``(batch_index, x0, y0, x1, y1)``."""
    if len(boxes) == 0:
        return torch.zeros((0, 5))
    device, dtype = boxes[0].device, boxes[0].dtype
    counts = torch.tensor([len(b) for b in boxes], device=device)
    batch_index = torch.repeat_interleave(torch.arange(len(boxes), device=device, dtype=dtype), counts)
    return torch.cat([batch_index[:, None], torch.cat(list(boxes), dim=0).to(dtype)], dim=1)


class ROIPooler(nn.Module):
    """Pool ``output_size x output_size`` features for boxes from a list of pyramid levels.

    Args:
        output_size: side of the pooled grid (7 for the box head, 14 for the mask head).
        scales: ``1 / stride`` of each feature map, finest first; must be consecutive powers of 2.
        sampling_ratio: ROIAlign samples per bin side; 0 = adaptive ``ceil(roi_size / output_size)``.
        pooler_type: "ROIAlignV2" (aligned, default) or "ROIAlign" (legacy, unaligned).
        canonical_box_size, canonical_level: the level-assignment anchor (224 px at level 4).
    """

    def __init__(
        self,
        output_size: int,
        scales: Sequence[float],
        sampling_ratio: int = 0,
        pooler_type: str = "ROIAlignV2",
        canonical_box_size: float = 224.0,
        canonical_level: int = 4,
    ):
        super().__init__()
        if pooler_type not in ("ROIAlignV2", "ROIAlign"):
            raise ValueError(f"Unsupported pooler_type {pooler_type!r}; use 'ROIAlignV2' or 'ROIAlign'")
        self.output_size: Tuple[int, int] = (int(output_size), int(output_size))
        self.scales = [float(s) for s in scales]
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = pooler_type == "ROIAlignV2"
        levels = [-math.log2(s) for s in self.scales]
        self.min_level = int(round(levels[0]))
        self.max_level = int(round(levels[-1]))
        expected = list(range(self.min_level, self.max_level + 1))
        if any(abs(lvl - e) > 1e-6 for lvl, e in zip(levels, expected)) or len(levels) != len(expected):
            raise ValueError(f"Pooler scales must be 1/2^k for consecutive k, got {self.scales}")
        self.canonical_box_size = float(canonical_box_size)
        self.canonical_level = int(canonical_level)

    def forward(self, features: List[Tensor], boxes: Union[List[Tensor], Tensor]) -> Tensor:
        """Pool boxes from ``features``.

        Args:
            features: one ``(N, C, Hl, Wl)`` map per level, in the order of ``scales``.
            boxes: per-image ``(Ri, 4)`` XYXY boxes in input pixels (a list of N tensors), or an
                already-built ``(R, 5)`` rois tensor with the image index in column 0.
        Returns:
            ``(R, C, S, S)`` pooled features in the order of the (concatenated) boxes, dtype of ``features``.
        """
        if len(features) != len(self.scales):
            raise ValueError(f"Expected {len(self.scales)} feature maps, got {len(features)}")
        rois = boxes if isinstance(boxes, Tensor) else boxes_to_rois(boxes)
        x0 = features[0]
        # Box coordinates stay at least float32: half precision cannot hold pixel positions above 2048
        # exactly, nor sub-pixel ones above 1024.
        rois = rois.to(device=x0.device, dtype=torch.float64 if x0.dtype == torch.float64 else torch.float32)
        if len(self.scales) == 1:
            return self._pool(x0, rois, self.scales[0])
        level_of_box = assign_boxes_to_levels(
            rois[:, 1:], self.min_level, self.max_level, self.canonical_box_size, self.canonical_level
        )
        out = x0.new_zeros((rois.shape[0], x0.shape[1]) + self.output_size)
        # One roi_align call per level (4 calls); boxes are scattered back to their input order.
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.nonzero(level_of_box == level, as_tuple=True)[0]
            if index.numel() == 0:
                continue
            out[index] = self._pool(feature, rois[index], scale).to(out.dtype)
        return out

    def _pool(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        # roi_align needs input and rois of one dtype, so half/bfloat16 features are pooled in
        # float32 (what torchvision's autocast rule does too).
        if feature.dtype != rois.dtype:
            return roi_align(feature.float(), rois, self.output_size, scale, self.sampling_ratio,
                             self.aligned).to(feature.dtype)
        return roi_align(feature, rois, self.output_size, scale, self.sampling_ratio, self.aligned)
