"""Training and test data loaders.

Training: the main process runs only the cheap :class:`~cutler.data.samplers.TrainingBatchSampler`
(index arithmetic); each worker process receives a whole :class:`~cutler.data.samplers.BatchTask` and
decodes, augments and copy-pastes the batch (:class:`TrainBatchDataset`). Every random draw of a sample is
seeded by ``(seed, stream position)``, and copy-paste by ``(seed, first position of the batch)``, so
batches do not depend on the number of workers, on timing, or on whether the run was resumed.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cutler.utils.image import ImageReadError
from cutler.utils.logging import get_logger, get_rank, get_world_size

from .coco import SerializedList, get_detection_dataset_dicts
from .copy_paste import CopyPasteParams, copy_paste_batch, save_copy_paste_visualization
from .mapper import DatasetMapper, MapperParams
from .samplers import BatchTask, TrainingBatchSampler, aspect_ratio_groups

logger = get_logger(__name__)

MAX_REPLACEMENTS = 16  # attempts to replace an undecodable image before giving up on the batch
NUM_VISUALIZED_BATCHES = 4  # dataloader.visualize_copy_paste writes this many batches per rank


def sample_rng(seed: int, position: int, attempt: int = 0) -> np.random.Generator:
    """The augmentation generator of the sample at global stream ``position`` (``attempt`` > 0: replacements)."""
    return np.random.default_rng([int(seed) % 2**63, int(position), int(attempt)])


def batch_generator(seed: int, first_position: int) -> torch.Generator:
    """The copy-paste generator of the batch whose first stream position is ``first_position``."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([int(seed) % 2**63, int(first_position), 1]).generate_state(1, np.uint64)[0] >> 1))
    return g


class TrainBatchDataset(Dataset):
    """Map-style dataset indexed by :class:`BatchTask`: returns a whole mapped (and copy-pasted) batch.

    ``dataset[task]`` -> ``{"inputs": List[model input dict], "state": sampler state after the batch,
    "batch_no": int, "skipped": List[str] (undecodable files replaced in this batch)}``. ``copy_paste``:
    CutLER's :class:`CopyPasteParams`, or a transform ``(inputs, positions, generator, records, mapper) ->
    inputs`` that draws its own sources (U2Seg's same-cluster copy-paste).
    """

    def __init__(self, records: Sequence[Dict], group_ids: np.ndarray, mapper: Callable, seed: int,
                 copy_paste: Optional[CopyPasteParams | Callable] = None, vis_dir: Optional[str] = None):
        self.records = records
        self.group_ids = np.asarray(group_ids)
        self.mapper, self.seed, self.copy_paste, self.vis_dir = mapper, int(seed), copy_paste, vis_dir

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, position: int, index: int, skipped: List[str]) -> Dict:
        for attempt in range(MAX_REPLACEMENTS + 1):
            rng = sample_rng(self.seed, position, attempt)
            if attempt:
                # A replacement from the same aspect-ratio bucket keeps the batch's grouping.
                same = np.flatnonzero(self.group_ids == self.group_ids[index])
                index = int(same[rng.integers(len(same))])
            record = self.records[index]
            try:
                return self.mapper(record, rng)
            except ImageReadError as e:
                logger.warning("skipping unreadable training image %s (%s); using another sample", e.path, e.reason)
                skipped.append(e.path)
        raise RuntimeError(f"{MAX_REPLACEMENTS + 1} images in a row could not be read (last: {skipped[-1]}); "
                           "check the dataset")

    def __getitem__(self, task: BatchTask) -> Dict:
        skipped: List[str] = []
        inputs = [self._load(p, i, skipped) for p, i in zip(task.positions, task.indices)]
        if self.copy_paste is not None:
            generator = batch_generator(self.seed, task.positions[0])
            if isinstance(self.copy_paste, CopyPasteParams):
                inputs = copy_paste_batch(inputs, self.copy_paste, generator)
            else:  # a transform that draws its sources from the dataset (U2Seg's same-cluster pairing)
                inputs = self.copy_paste(inputs, task.positions, generator, self.records, self.mapper)
            if self.vis_dir and task.batch_no < NUM_VISUALIZED_BATCHES:
                save_copy_paste_visualization(inputs, self.vis_dir, f"rank{get_rank()}_batch{task.batch_no}")
        return {"inputs": inputs, "state": task.state, "batch_no": task.batch_no, "skipped": skipped}


def _identity(x):
    return x


class TrainLoader:
    """Infinite iterable of per-rank training batches (dicts from :class:`TrainBatchDataset`) whose
    :meth:`state_dict` is the sampler position after the last batch handed out (not the prefetched ones)."""

    def __init__(self, records: Sequence[Dict], mapper: Callable, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, aspect_grouping: bool = True,
                 copy_paste: Optional[CopyPasteParams | Callable] = None, state: Optional[Dict] = None,
                 vis_dir: Optional[str] = None):
        groups = aspect_ratio_groups(records, aspect_grouping)
        self.sampler = TrainingBatchSampler(groups, batch_size, seed, rank, world_size, state)
        self.dataset = TrainBatchDataset(SerializedList(records), groups, mapper, seed, copy_paste, vis_dir)
        self._state = self.sampler.state_dict()
        # Our own generator: DataLoader would otherwise draw its worker base seed from the global torch RNG,
        # which a resumed run restores, and the two runs would diverge.
        self.loader = DataLoader(self.dataset, sampler=self.sampler, batch_size=None, num_workers=num_workers,
                                 collate_fn=_identity, persistent_workers=num_workers > 0,
                                 prefetch_factor=2 if num_workers > 0 else None, generator=torch.Generator())

    def __iter__(self) -> Iterator[Dict]:
        for batch in self.loader:
            self._state = batch["state"]
            yield batch

    def state_dict(self) -> Dict:
        return {"next_pos": self._state["next_pos"], "batch_no": self._state["batch_no"],
                "buffers": [list(b) for b in self._state["buffers"]]}


def build_train_loader(cfg, seed: int, state: Optional[Dict] = None, rank: Optional[int] = None,
                       world_size: Optional[int] = None, records: Optional[Sequence[Dict]] = None,
                       copy_paste: bool = True) -> TrainLoader:
    """The training loader of ``cfg`` for this rank.

    Args:
        cfg: the config (``datasets``, ``input``, ``dataloader``, ``solver.ims_per_batch``,
            ``model.roi_heads.num_classes``, ``output_dir``).
        seed: shared by all ranks (sampler order and augmentations).
        state: a previous :meth:`TrainLoader.state_dict` of this rank (exact resume).
        rank, world_size: default to the initialised process group / torchrun environment.
        records: already loaded records (default: read ``cfg.datasets.train``).
        copy_paste: False never pastes, whatever ``dataloader.copy_paste`` says (Precise BN: the published
            code pastes inside the training step, so its BN statistics come from un-pasted batches).

    Raises:
        ValueError: ``solver.ims_per_batch`` not divisible by the world size.
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    if str(cfg.dataloader.sampler_train) != "TrainingSampler":
        raise ValueError(f"dataloader.sampler_train={cfg.dataloader.sampler_train!r}: only 'TrainingSampler' is "
                         "implemented (the sampler of every CutLER recipe)")
    total = int(cfg.solver.ims_per_batch)
    if total % world_size:
        raise ValueError(f"solver.ims_per_batch={total} is not divisible by the number of processes {world_size}")
    if records is None:
        records = get_detection_dataset_dicts(list(cfg.datasets.train), cfg.datasets.root,
                                              filter_empty=bool(cfg.dataloader.filter_empty_annotations),
                                              class_agnostic=int(cfg.model.roi_heads.num_classes) == 1)
    num_classes = int(cfg.model.roi_heads.num_classes)
    if num_classes > 1:
        check_num_classes(records, num_classes, list(cfg.datasets.train))
    cp = CopyPasteParams.from_config(cfg) if copy_paste and cfg.dataloader.copy_paste else None
    if cp is not None:
        from cutler.u2seg.copy_paste import build_copy_paste

        cp = build_copy_paste(cfg, records, cp, seed)
    vis_dir = os.path.join(cfg.output_dir, "copy_paste_vis") if cp is not None and cfg.dataloader.visualize_copy_paste else None
    return TrainLoader(records, DatasetMapper(MapperParams.from_config(cfg, True)), total // world_size, seed, rank,
                       world_size, int(cfg.dataloader.num_workers), bool(cfg.dataloader.aspect_ratio_grouping), cp,
                       state, vis_dir)


def check_num_classes(records: Sequence[Dict], num_classes: int, names: Sequence[str]) -> None:
    """Raise ``ValueError`` when the records hold more classes than the model predicts (an instance of class
    ``num_classes`` would silently train as background)."""
    top = max((a["category_id"] for r in records for a in r["annotations"]), default=-1)
    if top >= num_classes:
        raise ValueError(f"training data {list(names)} has {top + 1} categories but model.roi_heads.num_classes="
                         f"{num_classes}; set num_classes to the number of categories (clusters)")


class _TestDataset(Dataset):
    def __init__(self, records: Sequence[Dict], mapper: Callable):
        self.records, self.mapper = records, mapper

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Dict:
        return self.mapper(self.records[i])


def build_test_loader(cfg, dataset_name: str, batch_size: int = 1, num_workers: Optional[int] = None) -> DataLoader:
    """Ordered loader of ``{"image", "height", "width", "image_id", "file_name"}`` dicts (lists of
    ``batch_size``), resized to ``input.min_size_test`` / ``max_size_test``, every image exactly once."""
    records = get_detection_dataset_dicts([dataset_name], cfg.datasets.root, filter_empty=False,
                                          class_agnostic=int(cfg.model.roi_heads.num_classes) == 1)
    workers = int(cfg.dataloader.num_workers) if num_workers is None else num_workers
    return DataLoader(_TestDataset(SerializedList(records), DatasetMapper(MapperParams.from_config(cfg, False))),
                      batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_identity)
