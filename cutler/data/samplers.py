"""The infinite, deterministic, rank-aware training batch sampler, with a saveable position.

The global stream is the concatenation of per-epoch permutations of ``range(N)``, epoch ``e`` shuffled by
a generator seeded with ``seed + e``; stream position ``p`` holds index ``perm_{p // N}[p % N]``. Rank ``r``
of ``W`` takes positions ``r, r + W, r + 2W, ...`` (like Detectron2's TrainingSampler) and groups them
into per-rank batches, optionally by aspect ratio (landscape / portrait buckets, like Detectron2's
AspectRatioGroupedDataset, but in index space so that the grouping does not depend on the workers).

The whole state is ``{"next_pos", "buffers"}`` of plain ints: saved in checkpoints, it lets a resumed run
draw exactly the batches the interrupted one would have drawn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch


@dataclass
class BatchTask:
    """One per-rank batch to build: stream ``positions`` and dataset ``indices`` (same length), the
    running batch number of this rank, and the sampler state right after this batch."""

    positions: List[int]
    indices: List[int]
    batch_no: int
    state: Dict


class TrainingBatchSampler:
    """Iterable of :class:`BatchTask` (never ends).

    Args:
        group_ids: ``(N,)`` int bucket of every dataset item (all zeros = no grouping).
        batch_size: images per batch on this rank.
        seed: shared by all ranks.
        rank, world_size: this process in the job.
        state: a :meth:`state_dict` from a previous run, or None to start at position ``rank``.
    """

    def __init__(self, group_ids: Sequence[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 state: Optional[Dict] = None):
        if batch_size < 1:
            raise ValueError(f"batch size per rank must be >= 1, got {batch_size}")
        self.group_ids = np.asarray(group_ids, dtype=np.int64)
        self.n = len(self.group_ids)
        if self.n == 0:
            raise ValueError("cannot sample from an empty dataset")
        self.num_groups = int(self.group_ids.max()) + 1
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, int(seed), rank, world_size
        state = state or {"next_pos": rank, "buffers": [[] for _ in range(self.num_groups)], "batch_no": 0}
        self._state = {"next_pos": int(state["next_pos"]), "batch_no": int(state.get("batch_no", 0)),
                       "buffers": [[int(p) for p in b] for b in state["buffers"]]}
        self._perm_epoch, self._perm = -1, None

    def index_at(self, pos: int) -> int:
        """Dataset index at global stream position ``pos``."""
        epoch = pos // self.n
        if epoch != self._perm_epoch:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).numpy(), epoch
        return int(self._perm[pos % self.n])

    def state_dict(self) -> Dict:
        """Position after the last batch produced by this object's iterator (a deep copy)."""
        return {"next_pos": self._state["next_pos"], "batch_no": self._state["batch_no"],
                "buffers": [list(b) for b in self._state["buffers"]]}

    def __iter__(self) -> Iterator[BatchTask]:
        st = self._state
        while True:
            pos = st["next_pos"]
            st["next_pos"] = pos + self.world_size
            bucket = st["buffers"][int(self.group_ids[self.index_at(pos)])]
            bucket.append(pos)
            if len(bucket) == self.batch_size:
                positions = list(bucket)
                bucket.clear()
                st["batch_no"] += 1
                yield BatchTask(positions, [self.index_at(p) for p in positions], st["batch_no"] - 1, self.state_dict())


def aspect_ratio_groups(records: Sequence[Dict], enabled: bool = True) -> np.ndarray:
    """``(N,)`` bucket ids: 0 for landscape (w > h), 1 otherwise; all 0 when grouping is disabled."""
    if not enabled:
        return np.zeros(len(records), dtype=np.int64)
    return np.asarray([0 if r["width"] > r["height"] else 1 for r in records], dtype=np.int64)
