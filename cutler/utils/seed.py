"""Seeding every random number generator the project uses."""
from __future__ import annotations

import os
import random
import time

import numpy as np


def seed_everything(seed: int = -1, deterministic: bool = False) -> int:
    """Seed Python, NumPy and torch (CPU and CUDA). ``seed < 0`` draws one from the clock.

    Returns the seed used, so it can be logged and reused.
    """
    import torch

    if seed < 0:
        seed = (os.getpid() + int(time.time() * 1e3)) % (2**31)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return seed
