"""Normalisation layers with Detectron2's names and semantics.

``get_norm(name, channels)`` understands Detectron2's vocabulary: ``""`` (none), ``"BN"``,
``"SyncBN"`` (``nn.SyncBatchNorm``; when ``torch.distributed`` is not initialised, or the world has
one process, PyTorch runs it as a plain ``BatchNorm2d`` on any device, so single-process CPU/GPU
training needs no conversion), ``"nnSyncBN"`` (alias), ``"FrozenBN"`` and ``"GN"`` (32 groups).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine parameters are fixed buffers.

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` in both train and eval
    mode. All four tensors are buffers (they are in the state dict under the same names as
    BatchNorm2d's, but receive no gradient). ``running_var`` starts at ``1 - eps`` so that a
    Caffe2-style checkpoint that only has an affine scale/shift reproduces ``weight * x + bias``
    exactly.
    """

    _version = 3

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(N, C, H, W)``; returns the same shape and dtype."""
        if x.requires_grad:
            # Fold into scale/shift so autograd flows to ``x`` only (F.batch_norm with
            # training=False would also work, but this keeps the input dtype under autocast).
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            shift = self.bias - self.running_mean * scale
            return x * scale.to(x.dtype).reshape(1, -1, 1, 1) + shift.to(x.dtype).reshape(1, -1, 1, 1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=self.eps)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # BatchNorm checkpoints carry a step counter that has no meaning here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            # Detectron2's rule for state dicts without version metadata (e.g. Caffe2 pickles that only
            # hold the affine scale/shift): absent statistics become mean 0 and var 1 (not 1 - eps).
            if prefix + "running_mean" not in state_dict:
                state_dict[prefix + "running_mean"] = torch.zeros_like(self.running_mean)
            if prefix + "running_var" not in state_dict:
                state_dict[prefix + "running_var"] = torch.ones_like(self.running_var)
        elif version < 3 and prefix + "running_var" in state_dict:
            # Version-2 FrozenBN used running_var without +eps.
            state_dict[prefix + "running_var"] = state_dict[prefix + "running_var"] - self.eps
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def convert_frozen_batchnorm(cls, module: nn.Module) -> nn.Module:
        """Return ``module`` with every ``BatchNorm2d``/``SyncBatchNorm`` replaced (recursively) by a
        FrozenBatchNorm2d holding the same statistics and affine parameters."""
        if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            frozen = cls(module.num_features, eps=module.eps)
            if module.affine:
                frozen.weight.copy_(module.weight.detach())
                frozen.bias.copy_(module.bias.detach())
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
            return frozen.to(next(iter(module.buffers()), frozen.weight).device)
        for name, child in module.named_children():
            new_child = cls.convert_frozen_batchnorm(child)
            if new_child is not child:
                module.add_module(name, new_child)
        return module


def get_norm(norm: str, out_channels: int) -> Optional[nn.Module]:
    """Build the normalisation layer named ``norm`` for ``out_channels`` channels (``None`` for "")."""
    if norm is None or norm == "":
        return None
    factories = {
        "BN": lambda c: nn.BatchNorm2d(c),
        "SyncBN": lambda c: nn.SyncBatchNorm(c),
        "nnSyncBN": lambda c: nn.SyncBatchNorm(c),
        "FrozenBN": lambda c: FrozenBatchNorm2d(c),
        "GN": lambda c: nn.GroupNorm(32, c),
    }
    if norm not in factories:
        raise ValueError(f"unknown norm '{norm}'; expected one of {[''] + sorted(factories)}")
    return factories[norm](out_channels)
