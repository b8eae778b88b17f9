"""Box head: Detectron2's ``FastRCNNConvFCHead`` (optional 3x3 convs, then flatten + FC + ReLU)."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..layers import conv3x3_norm_relu, c2_xavier_fill

__all__ = ["FastRCNNConvFCHead"]


class FastRCNNConvFCHead(nn.Sequential):
    """``num_conv`` conv layers (``conv1``..) then ``num_fc`` FC layers (``fc1``..), each + ReLU.

    Key names match Detectron2 (``fc1.weight``, ``fc2.bias``, ``conv1.norm.weight``). The flatten is
    C-major (``torch.flatten`` of NCHW), which is what the published FC weights expect.

    Args:
        in_channels, resolution: pooled input shape ``(C, S, S)``.
        conv_dims: output channels of each conv; fc_dims: output size of each FC.
        conv_norm: "" | "BN" | "SyncBN" | "GN" for the convs.
    Input ``(R, C, S, S)``; output ``(R, fc_dims[-1])`` (or ``(R, C', S, S)`` with no FC layers).
    """

    def __init__(self, in_channels: int, resolution: int, conv_dims: Sequence[int] = (),
                 fc_dims: Sequence[int] = (1024, 1024), conv_norm: str = ""):
        super().__init__()
        if len(conv_dims) + len(fc_dims) == 0:
            raise ValueError("FastRCNNConvFCHead needs at least one conv or FC layer")
        channels = in_channels
        for k, dim in enumerate(conv_dims):
            self.add_module(f"conv{k + 1}", conv3x3_norm_relu(channels, dim, conv_norm))
            channels = dim
        size = channels * resolution * resolution
        for k, dim in enumerate(fc_dims):
            if k == 0:
                self.add_module("flatten", nn.Flatten())
            fc = nn.Linear(size, dim)
            c2_xavier_fill(fc)
            self.add_module(f"fc{k + 1}", fc)
            self.add_module(f"fc_relu{k + 1}", nn.ReLU())
            size = dim
        self.output_size = size

