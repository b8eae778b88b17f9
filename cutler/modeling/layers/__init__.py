"""Layers shared by the detector: Detectron2-named conv wrapper and normalisation."""
from .conv import Conv2d, c2_msra_fill, c2_xavier_fill, conv3x3_norm_relu
from .norm import FrozenBatchNorm2d, get_norm

__all__ = ["Conv2d", "conv3x3_norm_relu", "FrozenBatchNorm2d", "c2_msra_fill", "c2_xavier_fill", "get_norm"]
