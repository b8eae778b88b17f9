"""Where training metrics go: console lines, ``metrics.jsonl`` and TensorBoard scalars (rank 0 only)."""
from __future__ import annotations

import datetime
import json
import time
from collections import deque
from pathlib import Path
from typing import Dict, Optional

from cutler.utils.io import atomic_write_text
from cutler.utils.logging import get_logger

logger = get_logger(__name__)


class MetricsWriter:
    """Append ``{"iteration": i, **scalars}`` lines to ``output_dir/metrics.jsonl`` and TensorBoard.

    Args:
        output_dir: the run folder.
        tensorboard: also write ``output_dir/tensorboard`` event files (skipped with a warning when the
            ``tensorboard`` package is absent).
    """

    def __init__(self, output_dir: str | Path, tensorboard: bool = True, start_iter: int = 0):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate(start_iter)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError as e:  # pragma: no cover - tensorboard is a dependency
                logger.warning("TensorBoard logging off: %s", e)

    def _truncate(self, start_iter: int) -> None:
        """Keep only lines of iterations <= ``start_iter``: a fresh run starts an empty file, a resumed one
        drops what the interrupted run logged after its checkpoint (it is about to be redone)."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("iteration", 0) <= start_iter:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
        atomic_write_text(self.path, "".join(k + "\n" for k in kept) if start_iter > 0 else "")

    def write(self, iteration: int, scalars: Dict[str, float]) -> None:
        # One line per write, flushed: a killed run keeps every line written before it died.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"iteration": iteration, **scalars}) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, iteration)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class IterationTimer:
    """Seconds per iteration over a sliding window, for it/s and ETA."""

    def __init__(self, window: int = 20):
        self._times: deque = deque(maxlen=window)
        self._last: Optional[float] = None

    def tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self._times.append(now - self._last)
        self._last = now

    def reset(self) -> None:
        """Forget the current interval (after an evaluation or checkpoint pause)."""
        self._last = time.perf_counter()

    @property
    def seconds_per_iter(self) -> Optional[float]:
        return sum(self._times) / len(self._times) if self._times else None


def format_console_line(iteration: int, max_iter: int, losses: Dict[str, float], lr: float,
                        sec_per_iter: Optional[float], data_time: float) -> str:
    """``iter 120/200  eta 0:00:31  loss 1.234 (loss_cls 0.5 ...)  lr 0.01  2.6 it/s  data 0.002s``."""
    total = sum(losses.values())
    parts = [f"iter {iteration}/{max_iter}"]
    if sec_per_iter:
        parts.append(f"eta {datetime.timedelta(seconds=int(sec_per_iter * (max_iter - iteration)))}")
    parts.append(f"total_loss {total:.4f} (" + " ".join(f"{k} {v:.4f}" for k, v in losses.items()) + ")")
    parts.append(f"lr {lr:.6g}")
    if sec_per_iter:
        parts.append(f"{1.0 / sec_per_iter:.2f} it/s")
    parts.append(f"data {data_time:.4f}s")
    return "  ".join(parts)
