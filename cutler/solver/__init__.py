"""Optimisation: SGD parameter groups, LR schedules, gradient clipping, SyncBN and Precise BN."""
from .build import build_gradient_clipper, build_optimizer, get_param_groups
from .lr_scheduler import (build_lr_scheduler, load_lr_scheduler_state, lr_multiplier, warmup_factor_at,
                           warmup_lr_scheduler)
from .norm import config_uses_syncbn, maybe_convert_sync_batchnorm, update_bn_stats

__all__ = ["build_gradient_clipper", "build_optimizer", "get_param_groups", "build_lr_scheduler",
           "load_lr_scheduler_state", "lr_multiplier", "warmup_factor_at", "warmup_lr_scheduler", "config_uses_syncbn",
           "maybe_convert_sync_batchnorm", "update_bn_stats"]
