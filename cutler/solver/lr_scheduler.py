"""Iteration-based LR schedules: linear/constant warmup times multi-step or cosine decay, as a
``torch.optim.lr_scheduler.LambdaLR`` over :func:`lr_multiplier`.

``lr(it) = base_lr_of_group * lr_multiplier(it)``, Detectron2's (legacy) formulas:

- ``warmup(it) = warmup_factor * (1 - a) + a`` with ``a = it / warmup_iters`` for ``it < warmup_iters``
  ("linear"), ``warmup_factor`` ("constant"), else 1;
- multi-step: ``decay(it) = gamma ** (number of steps <= it)``;
- cosine: ``decay(it) = end + (1 - end) * 0.5 * (1 + cos(pi * it / max_iter))``, ``end = base_lr_end / base_lr``.

The scheduler is stepped once per iteration, after ``optimizer.step()``. Its state (torch's: the
iteration as ``last_epoch``, base and last LRs) is plain numbers, so checkpoints load with
``torch.load(weights_only=True)``; :func:`load_lr_scheduler_state` also reads the ``{"iter": n}`` state of
checkpoints written before the schedule was a ``LambdaLR``.
"""
from __future__ import annotations

import bisect
import math
from typing import Any, Dict, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR

from cutler.utils.logging import get_logger

logger = get_logger(__name__)

SCHEDULES = ("WarmupMultiStepLR", "WarmupCosineLR")


def warmup_factor_at(it: int, method: str, warmup_iters: int, warmup_factor: float) -> float:
    """The warmup multiplier at iteration ``it``."""
    if it >= warmup_iters:
        return 1.0
    if method == "constant":
        return warmup_factor
    if method == "linear":
        alpha = it / warmup_iters
        return warmup_factor * (1 - alpha) + alpha
    raise ValueError(f"unknown warmup method '{method}' (expected 'linear' or 'constant')")


def lr_multiplier(it: int, name: str, max_iter: int, steps: Sequence[int] = (), gamma: float = 0.1,
                  end_ratio: float = 0.0, warmup_iters: int = 0, warmup_factor: float = 0.001,
                  warmup_method: str = "linear") -> float:
    """The LR factor at iteration ``it`` (0-based) of schedule ``name`` (one of :data:`SCHEDULES`).

    ``steps`` must be sorted; ``end_ratio`` is ``base_lr_end / base_lr`` (cosine only).
    """
    w = warmup_factor_at(it, warmup_method, warmup_iters, warmup_factor)
    if name == "WarmupMultiStepLR":
        return w * gamma ** bisect.bisect_right(steps, it)
    cos = 0.5 * (1.0 + math.cos(math.pi * min(it, max_iter) / max_iter))
    return w * (end_ratio + (1.0 - end_ratio) * cos)


def warmup_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, max_iter: int, steps: Sequence[int] = (),
                        gamma: float = 0.1, base_lr: float = 1.0, base_lr_end: float = 0.0, warmup_iters: int = 0,
                        warmup_factor: float = 0.001, warmup_method: str = "linear") -> LambdaLR:
    """A ``LambdaLR`` setting every group's LR to its initial LR times :func:`lr_multiplier`.

    Args:
        optimizer: its groups' current ``lr`` become their ``initial_lr`` (base LRs).
        name: one of :data:`SCHEDULES` (``cfg.solver.lr_scheduler_name``).
        max_iter, steps, gamma, base_lr, base_lr_end, warmup_*: as in ``cfg.solver``.

    Raises:
        ValueError: an unknown schedule, steps that are not increasing, or an unknown warmup method (when
            iteration 0 is inside the warmup).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown solver.lr_scheduler_name '{name}' (WarmupMultiStepLR | WarmupCosineLR)")
    if list(steps) != sorted(steps):
        raise ValueError(f"solver.steps must be increasing, got {list(steps)}")
    if name == "WarmupMultiStepLR" and any(s > max_iter for s in steps):
        logger.warning("solver.steps %s go beyond solver.max_iter=%d: those LR steps never happen", list(steps), max_iter)
    kwargs = dict(name=name, max_iter=int(max_iter), steps=[int(s) for s in steps], gamma=float(gamma),
                  end_ratio=float(base_lr_end) / float(base_lr) if base_lr else 0.0, warmup_iters=int(warmup_iters),
                  warmup_factor=float(warmup_factor), warmup_method=warmup_method)

    def multiplier(it: int) -> float:  # a plain function: LambdaLR keeps it out of the state dict
        return lr_multiplier(it, **kwargs)

    return LambdaLR(optimizer, multiplier)


def load_lr_scheduler_state(scheduler: LambdaLR, state: Dict[str, Any]) -> None:
    """Restore ``scheduler`` from its ``state_dict()``, or from ``{"iter": n}`` (checkpoints written before the
    schedule was a ``LambdaLR``: the iteration is all that state held, the LRs follow from the multiplier).

    Call it after the optimizer's ``load_state_dict``. Every group's LR is then set for the restored
    iteration from this scheduler's multiplier, so a run resumed with a changed schedule follows the new
    one from its first iteration on.
    """
    if "last_epoch" in state or "iter" not in state:
        scheduler.load_state_dict(state)
    else:
        scheduler.last_epoch = int(state["iter"])
        scheduler.base_lrs = [group["initial_lr"] for group in scheduler.optimizer.param_groups]
    for group, base_lr, multiplier in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * multiplier(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer) -> LambdaLR:
    """The scheduler of ``cfg.solver``."""
    s = cfg.solver
    return warmup_lr_scheduler(optimizer, str(s.lr_scheduler_name), int(s.max_iter), list(s.steps), float(s.gamma),
                               float(s.base_lr), float(s.base_lr_end), int(s.warmup_iters), float(s.warmup_factor),
                               str(s.warmup_method))
