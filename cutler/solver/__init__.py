"""Optimisation: SGD parameter groups, LR schedules, gradient clipping, SyncBN and Precise BN."""
from .build import build_gradient_clipper, build_optimizer, get_param_groups
from .lr_scheduler import WarmupLRScheduler, build_lr_scheduler, warmup_factor_at
from .norm import config_uses_syncbn, maybe_convert_sync_batchnorm, update_bn_stats

__all__ = ["build_gradient_clipper", "build_optimizer", "get_param_groups", "WarmupLRScheduler", "build_lr_scheduler",
           "warmup_factor_at", "config_uses_syncbn", "maybe_convert_sync_batchnorm", "update_bn_stats"]
