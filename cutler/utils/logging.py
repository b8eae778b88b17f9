"""Rank-aware logging: rank 0 logs at INFO to the console, other ranks only warnings; all ranks may log to files."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

_FMT = "[%(asctime)s %(name)s%(rank)s] %(levelname)s %(message)s"


def get_rank() -> int:
    """The distributed rank: from torch.distributed when initialised, else torchrun/SLURM env vars, else 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover
        pass
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def get_world_size() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("WORLD_SIZE", 1))


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = get_rank()
        record.rank = f" r{rank}" if get_world_size() > 1 else ""
        return True


def setup_logger(output_dir: Optional[str] = None, name: str = "cutler", level: int = logging.INFO) -> logging.Logger:
    """Configure the ``cutler`` logger once: console (rank 0 at ``level``, others WARNING) and optionally
    ``output_dir/log.txt`` (rank 0) or ``log.txt.rankN`` (others)."""
    logger = logging.getLogger(name)
    rank = get_rank()
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    fmt = logging.Formatter(_FMT, datefmt="%m/%d %H:%M:%S")
    if not any(getattr(h, "_cutler_console", False) for h in logger.handlers):
        console = logging.StreamHandler(sys.stdout)
        console.setLevel(level if rank == 0 else logging.WARNING)
        console.setFormatter(fmt)
        console.addFilter(_RankFilter())
        console._cutler_console = True
        logger.addHandler(console)
    if output_dir:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        filename = Path(output_dir) / ("log.txt" if rank == 0 else f"log.txt.rank{rank}")
        if not any(getattr(h, "baseFilename", None) == str(filename.resolve()) for h in logger.handlers):
            fh = logging.FileHandler(filename)
            fh.setLevel(logging.DEBUG)
            fh.setFormatter(fmt)
            fh.addFilter(_RankFilter())
            logger.addHandler(fh)
    return logger


def get_logger(name: str) -> logging.Logger:
    """A child of the ``cutler`` logger, e.g. ``get_logger(__name__)``."""
    if not name.startswith("cutler"):
        name = f"cutler.{name}"
    return logging.getLogger(name)
