"""``Conv2d`` that owns its normalisation and activation, as Detectron2's wrapper does.

Owning the norm as the ``.norm`` child gives state-dict keys ``<name>.weight`` and
``<name>.norm.{weight,bias,running_mean,running_var}``, the names Detectron2 checkpoints use.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn
from torch.nn import functional as F


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` followed by an optional ``norm`` module and ``activation`` callable."""

    def __init__(self, *args, norm: Optional[nn.Module] = None,
                 activation: Optional[Callable[[Tensor], Tensor]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def c2_msra_fill(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) weights and zero bias: Detectron2's ResNet conv init."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


def c2_xavier_fill(module: nn.Module) -> None:
    """Kaiming-uniform with a=1 (Caffe2's "XavierFill") and zero bias: Detectron2's FPN conv init."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


def conv3x3_norm_relu(in_channels: int, out_channels: int, norm: str = "") -> Conv2d:
    """3x3 conv (bias only without norm) + optional norm + ReLU, MSRA-initialised: the conv towers of
    Detectron2's box and mask heads (keys ``<name>.weight``, ``<name>.norm.*``)."""
    from .norm import get_norm

    conv = Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=not norm,
                  norm=get_norm(norm, out_channels), activation=F.relu)
    c2_msra_fill(conv)
    return conv
