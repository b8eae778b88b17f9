"""Small layers shared by the ROI heads, laid out so Detectron2 checkpoints load key for key."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["Conv2dNormReLU", "make_norm", "c2_msra_fill", "c2_xavier_fill"]


def make_norm(norm: str, channels: int) -> Optional[nn.Module]:
    """The normalisation layer named by a Detectron2 ``NORM`` string ("" = none)."""
    if norm in ("", None):
        return None
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if norm == "GN":
        return nn.GroupNorm(32, channels)
    raise ValueError(f"Unsupported ROI head norm {norm!r}; use '', 'BN', 'SyncBN' or 'GN'")


def c2_msra_fill(module: nn.Module) -> None:
    """Caffe2's MSRAFill: He-normal weights (fan_out, ReLU gain), zero bias."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


def c2_xavier_fill(module: nn.Module) -> None:
    """Caffe2's XavierFill: uniform with bound sqrt(3 / fan_in) (kaiming_uniform with a=1), zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


class Conv2dNormReLU(nn.Conv2d):
    """3x3 conv (+ optional ``.norm``) + ReLU; the norm is a child so its keys read ``<name>.norm.*``."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = ""):
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1, bias=not norm)
        self.norm = make_norm(norm, out_channels)
        c2_msra_fill(self)

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        return torch.relu(x)
