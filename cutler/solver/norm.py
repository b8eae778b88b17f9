"""BatchNorm across processes (SyncBN) and Precise BN (recomputed population statistics)."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, List

import torch
from torch import nn

from cutler.utils.logging import get_logger

logger = get_logger(__name__)


def config_uses_syncbn(cfg) -> bool:
    """Whether any norm setting of ``cfg.model`` names SyncBN (backbone, FPN, box or mask head)."""
    m = cfg.model
    return any(str(n) in ("SyncBN", "NaiveSyncBN") for n in (m.resnets.norm, m.fpn.norm, m.roi_box_head.norm, m.roi_mask_head.norm))


def maybe_convert_sync_batchnorm(model: nn.Module, cfg, world_size: int, device: torch.device) -> nn.Module:
    """Convert BatchNorm layers to ``nn.SyncBatchNorm`` when the config asks for SyncBN and the job has
    several processes on CUDA. On one process SyncBN is plain BN; on CPU (gloo) torch has no SyncBN, so
    each process keeps its own statistics and a warning says so."""
    if world_size <= 1 or not config_uses_syncbn(cfg):
        return model
    if device.type != "cuda":
        logger.warning("SyncBN requested with %d processes on %s: torch's SyncBatchNorm needs CUDA, "
                       "BatchNorm statistics stay per process", world_size, device.type)
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _bn_modules(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
            and m.track_running_stats]


@torch.no_grad()
def update_bn_stats(model: nn.Module, data: Iterable, num_iter: int, forward: Callable | None = None) -> int:
    """Precise BN: replace every BatchNorm's running mean/var by their average over ``num_iter`` batches.

    The model runs in training mode (batch statistics normalise, as in training) without gradients. The
    mean of the per-batch means is the population mean; the per-batch variances are averaged likewise
    (fvcore's estimate). With SyncBN the per-batch statistics are already global.

    Args:
        model: in training mode.
        data: iterable of model inputs.
        num_iter: batches to use.
        forward: ``forward(model, batch)`` (default ``model(batch)``).

    Returns:
        The number of batches used (fewer than ``num_iter`` if ``data`` ran out, with a warning).
    """
    bns = _bn_modules(model)
    if not bns:
        return 0
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 1.0  # running stats = this batch's stats
    means = [torch.zeros_like(bn.running_mean) for bn in bns]
    variances = [torch.zeros_like(bn.running_var) for bn in bns]
    done = 0
    it: Iterator = iter(data)
    try:
        for done in range(1, num_iter + 1):
            try:
                batch = next(it)
            except StopIteration:
                done -= 1
                logger.warning("precise BN: data ran out after %d of %d batches", done, num_iter)
                break
            (forward or (lambda m, b: m(b)))(model, batch)
            for i, bn in enumerate(bns):
                # Running average: after k batches it is the mean of the k batch statistics.
                means[i] += (bn.running_mean - means[i]) / done
                variances[i] += (bn.running_var - variances[i]) / done
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
    if done:
        for bn, mean, var in zip(bns, means, variances):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    return done
