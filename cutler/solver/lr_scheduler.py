"""Iteration-based LR schedules: linear/constant warmup times multi-step or cosine decay.

``lr(it) = base_lr_of_group * warmup(it) * decay(it)``, Detectron2's (legacy) formulas:

- ``warmup(it) = warmup_factor * (1 - a) + a`` with ``a = it / warmup_iters`` for ``it < warmup_iters``
  ("linear"), ``warmup_factor`` ("constant"), else 1;
- multi-step: ``decay(it) = gamma ** (number of steps <= it)``;
- cosine: ``decay(it) = end + (1 - end) * 0.5 * (1 + cos(pi * it / max_iter))``, ``end = base_lr_end / base_lr``.

The scheduler is stepped once per iteration, after ``optimizer.step()``; its state is plain numbers so
checkpoints load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import bisect
import math
from typing import Dict, List, Sequence

import torch

from cutler.utils.logging import get_logger

logger = get_logger(__name__)


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


class WarmupLRScheduler:
    """Sets ``param_group["lr"] = param_group["initial_lr"] * multiplier(it)`` for every group.

    Args:
        optimizer: its groups' current ``lr`` become their ``initial_lr`` (base LRs).
        name: ``"WarmupMultiStepLR"`` or ``"WarmupCosineLR"``.
        max_iter, steps, gamma, base_lr, base_lr_end, warmup_*: as in ``cfg.solver``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, max_iter: int, steps: Sequence[int] = (),
                 gamma: float = 0.1, base_lr: float = 1.0, base_lr_end: float = 0.0, warmup_iters: int = 0,
                 warmup_factor: float = 0.001, warmup_method: str = "linear"):
        if name not in ("WarmupMultiStepLR", "WarmupCosineLR"):
            raise ValueError(f"unknown solver.lr_scheduler_name '{name}' (WarmupMultiStepLR | WarmupCosineLR)")
        if list(steps) != sorted(steps):
            raise ValueError(f"solver.steps must be increasing, got {list(steps)}")
        if name == "WarmupMultiStepLR" and any(s > max_iter for s in steps):
            logger.warning("solver.steps %s go beyond solver.max_iter=%d: those LR steps never happen", list(steps), max_iter)
        self.optimizer = optimizer
        self.name, self.max_iter, self.steps, self.gamma = name, int(max_iter), [int(s) for s in steps], float(gamma)
        self.end_ratio = float(base_lr_end) / float(base_lr) if base_lr else 0.0
        self.warmup_iters, self.warmup_factor, self.warmup_method = int(warmup_iters), float(warmup_factor), warmup_method
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.iter = 0
        self._apply()

    def multiplier(self, it: int) -> float:
        """The LR factor at iteration ``it`` (0-based)."""
        w = warmup_factor_at(it, self.warmup_method, self.warmup_iters, self.warmup_factor)
        if self.name == "WarmupMultiStepLR":
            return w * self.gamma ** bisect.bisect_right(self.steps, it)
        cos = 0.5 * (1.0 + math.cos(math.pi * min(it, self.max_iter) / self.max_iter))
        return w * (self.end_ratio + (1.0 - self.end_ratio) * cos)

    def _apply(self) -> None:
        m = self.multiplier(self.iter)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * m

    def step(self) -> None:
        """Advance one iteration."""
        self.iter += 1
        self._apply()

    def get_last_lr(self) -> List[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> Dict:
        return {"iter": self.iter}

    def load_state_dict(self, state: Dict) -> None:
        self.iter = int(state["iter"])
        self._apply()


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer) -> WarmupLRScheduler:
    """The scheduler of ``cfg.solver``."""
    s = cfg.solver
    return WarmupLRScheduler(optimizer, str(s.lr_scheduler_name), int(s.max_iter), list(s.steps), float(s.gamma),
                             float(s.base_lr), float(s.base_lr_end), int(s.warmup_iters), float(s.warmup_factor),
                             str(s.warmup_method))
