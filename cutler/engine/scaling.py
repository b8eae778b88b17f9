"""Detectron2's linear scaling rule for running a recipe on a different number of GPUs."""
from __future__ import annotations

import copy

from omegaconf import OmegaConf

from cutler.utils.logging import get_logger

logger = get_logger(__name__)


def auto_scale_workers(cfg, world_size: int):
    """Rescale a recipe written for ``solver.reference_world_size`` processes to ``world_size``.

    With ``f = world_size / reference_world_size``: ``ims_per_batch`` and ``base_lr`` are multiplied by
    ``f``; ``max_iter``, ``warmup_iters``, ``steps``, ``checkpoint_period`` and ``test.eval_period`` are
    divided by it (each image is seen as often, the LR follows the batch). Images per process stay the
    same. ``reference_world_size = 0`` (or equal to ``world_size``) changes nothing.

    Returns:
        ``cfg`` itself when unchanged, else a rescaled read-only copy.

    Raises:
        ValueError: the rescaled batch is not a whole number of images per process.
    """
    ref = int(cfg.solver.reference_world_size)
    if ref <= 0 or ref == world_size:
        return cfg
    old_bs = int(cfg.solver.ims_per_batch)
    if old_bs % ref:
        raise ValueError(f"solver.ims_per_batch={old_bs} is not divisible by solver.reference_world_size={ref}")
    f = world_size / ref
    bs = int(round(old_bs * f))
    new = copy.deepcopy(cfg)
    OmegaConf.set_readonly(new, False)
    s = new.solver
    s.ims_per_batch = bs
    s.base_lr = float(cfg.solver.base_lr) * f
    s.max_iter = int(round(cfg.solver.max_iter / f))
    s.warmup_iters = int(round(cfg.solver.warmup_iters / f))
    s.steps = [int(round(x / f)) for x in cfg.solver.steps]
    s.checkpoint_period = int(round(cfg.solver.checkpoint_period / f))
    new.test.eval_period = int(round(cfg.test.eval_period / f))
    s.reference_world_size = world_size
    OmegaConf.set_readonly(new, True)
    logger.info("auto-scaled the recipe from %d to %d processes: ims_per_batch %d -> %d, base_lr %g -> %g, "
                "max_iter %d -> %d, steps %s -> %s", ref, world_size, old_bs, bs, cfg.solver.base_lr, s.base_lr,
                cfg.solver.max_iter, s.max_iter, list(cfg.solver.steps), list(s.steps))
    return new
