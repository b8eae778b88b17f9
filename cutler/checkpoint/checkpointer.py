"""Training checkpoints: atomic, keep-last-K, everything needed to continue bit-exactly.

A checkpoint is one ``.pth`` file holding a dict of plain types and tensors only, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs)::

    {"model": state dict, "optimizer": ..., "scheduler": ..., "scaler": ... | None,
     "iteration": int (iterations completed), "seed": int, "world_size": int,
     "sampler": [per-rank sampler state], "rng": [per-rank RNG state], "config": YAML str}

Periodic files are named ``model_{iteration - 1:07d}.pth`` (Detectron2's naming), the final one
``model_final.pth``; ``last_checkpoint`` (a text file) names the newest.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from cutler.utils.io import atomic_torch_save, atomic_write_text
from cutler.utils.logging import get_logger

from .weights import torch_load_weights_only

logger = get_logger(__name__)

_PERIODIC = re.compile(r"^model_(\d{7})\.pth$")
LAST_CHECKPOINT_FILE = "last_checkpoint"


def capture_rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as tensors and plain types."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only when as many devices are visible)."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    elif cuda:
        logger.warning("checkpoint holds %d CUDA RNG states, %d devices visible: CUDA RNG not restored", len(cuda),
                       torch.cuda.device_count() if torch.cuda.is_available() else 0)


class Checkpointer:
    """Writes and finds checkpoints in ``save_dir``.

    Args:
        save_dir: the run's output folder.
        keep_last: periodic checkpoints to keep (older ones are deleted after a successful save;
            ``model_final.pth`` is never deleted). ``<= 0`` keeps all.
    """

    def __init__(self, save_dir: str | Path, keep_last: int = 3):
        self.save_dir = Path(save_dir)
        self.keep_last = int(keep_last)

    @staticmethod
    def periodic_name(iteration: int) -> str:
        return f"model_{iteration - 1:07d}.pth"

    def save(self, name: str, state: Dict[str, Any]) -> Path:
        """Write ``state`` to ``save_dir/name`` atomically, point ``last_checkpoint`` at it, prune old ones."""
        path = self.save_dir / name
        atomic_torch_save(state, path)
        atomic_write_text(self.save_dir / LAST_CHECKPOINT_FILE, name)
        logger.info("saved checkpoint %s", path)
        self._prune()
        return path

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        periodic = sorted(p for p in self.save_dir.iterdir() if _PERIODIC.match(p.name))
        for p in periodic[:-self.keep_last]:
            p.unlink(missing_ok=True)

    def list_checkpoints(self) -> List[Path]:
        return sorted(p for p in self.save_dir.glob("model_*.pth") if _PERIODIC.match(p.name) or p.name == "model_final.pth")

    def last_checkpoint(self) -> Optional[Path]:
        """The checkpoint ``last_checkpoint`` names (falling back to the newest file), or None."""
        marker = self.save_dir / LAST_CHECKPOINT_FILE
        if marker.is_file():
            path = self.save_dir / marker.read_text().strip()
            if path.is_file():
                return path
        found = self.list_checkpoints()
        final = self.save_dir / "model_final.pth"
        return final if final in found else (found[-1] if found else None)

    @staticmethod
    def load(path: str | Path) -> Dict[str, Any]:
        """Read one of our checkpoints (``weights_only=True``, onto the CPU)."""
        return torch_load_weights_only(path)
