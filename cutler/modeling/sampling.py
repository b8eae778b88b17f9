"""Sampling foreground/background proposals for training losses."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def subsample_labels(labels: Tensor, num_samples: int, positive_fraction: float, bg_label: int) -> Tuple[Tensor, Tensor]:
    """Randomly pick at most ``num_samples`` indices, at most ``positive_fraction`` of them foreground.

    Args:
        labels: ``(N,)`` int labels; -1 = ignore, ``bg_label`` = background, anything else = foreground.
        num_samples: total to sample; fewer positives are made up with negatives where possible.
        positive_fraction: target fraction of positives.
        bg_label: the background label.

    Returns:
        ``(pos_idx, neg_idx)`` int64 index tensors (uses the global torch RNG).
    """
    positive = torch.nonzero((labels != -1) & (labels != bg_label), as_tuple=True)[0]
    negative = torch.nonzero(labels == bg_label, as_tuple=True)[0]
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)
    perm_pos = torch.randperm(positive.numel(), device=positive.device)[:num_pos]
    perm_neg = torch.randperm(negative.numel(), device=negative.device)[:num_neg]
    return positive[perm_pos], negative[perm_neg]
