"""The batched MaskCut driver: decode (DataLoader workers) -> ViT (device, batched) -> NCut (device,
batched) -> CRF + encoding (process pool, overlapping the next batches) -> atomic chunk writer."""
from __future__ import annotations

import abc
import collections
import concurrent.futures as cf
import multiprocessing as mp
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..utils.device import resolve_device
from ..utils.logging import get_logger
from .crf import CRFParams
from .dataset import ImageRecord, MaskCutImages, collate_items
from .ncut import COMPAT_MODES, STATUS_NAMES, MaskCutOutput, maskcut_patches, upsample_stage_masks
from .postprocess import postprocess_image
from .vit import DinoFeatureExtractor
from .writer import ShardWriter, shard_dir_name

logger = get_logger(__name__)

PHASES = ("decode", "vit", "ncut", "crf", "encode")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_crf_mode(mode: str, device: torch.device) -> str:
    """``"pydensecrf"`` | ``"torch"`` | ``"none"``; ``"auto"`` = torch on CUDA, else pydensecrf."""
    mode = (mode or "auto").lower()
    if mode == "auto":
        return "torch" if device.type == "cuda" else "pydensecrf"
    if mode not in ("pydensecrf", "torch", "none"):
        raise ValueError(f"unknown maskcut.crf '{mode}', expected pydensecrf | torch | none | auto")
    return mode


def _solver_dtype(name: str) -> torch.dtype:
    return {"float64": torch.float64, "float32": torch.float32}[name]


class MaskCutModel:
    """ViT features + batched MaskCut on the patch grid for one configuration.

    Args:
        cfg: a :class:`cutler.config.MaskCutConfig` (or any object with its fields).
        device: overrides ``cfg.device``.
    """

    def __init__(self, cfg, device: Optional[torch.device] = None):
        self.cfg = cfg
        spec = cfg.device
        if (spec or "auto") == "auto" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
            spec = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"  # torchrun: one GPU per rank
        self.device = device or resolve_device(spec)
        self.compat = getattr(cfg, "compat", "default")
        if self.compat not in COMPAT_MODES:  # before any image: a per-batch error would record every image as failed
            raise ValueError(f"unknown maskcut.compat '{self.compat}', expected one of {COMPAT_MODES}")
        published = self.compat == "published"
        # the published script runs DINO's own float32 ViT: explicit attention, no autocast
        amp = "float32" if published and cfg.dtype == "auto" else cfg.dtype
        self.extractor = DinoFeatureExtractor(cfg.vit_arch, cfg.patch_size, cfg.vit_feat, cfg.pretrain_path,
                                              amp, match_dino=published).to(self.device)
        self.solver_kwargs = {"dtype": _solver_dtype(getattr(cfg, "solver_dtype", "float64")),
                              "tol": float(getattr(cfg, "solver_tol", 1e-9))}
        self.timings: Dict[str, float] = collections.defaultdict(float)

    @torch.no_grad()
    def features(self, resized: Sequence[np.ndarray]) -> torch.Tensor:
        """``B`` ``(S, S, 3)`` uint8 arrays -> ``(B, P, C)`` float32 patch features on the device."""
        x = torch.from_numpy(np.stack(resized)).to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        return self.extractor(x)

    @torch.no_grad()
    def patch_masks(self, resized: Sequence[np.ndarray], solver: Optional[str] = None) -> MaskCutOutput:
        """MaskCut stage masks on the patch grid for a batch of resized images (timed per phase)."""
        side = resized[0].shape[0]
        grid = (side // self.cfg.patch_size, resized[0].shape[1] // self.cfg.patch_size)
        t0 = time.perf_counter()
        feats = self.features(resized)
        _sync(self.device)
        t1 = time.perf_counter()
        out = maskcut_patches(feats, grid, self.cfg.n, self.cfg.tau, self.cfg.eps, solver or self.cfg.solver,
                              self.cfg.min_area_fraction, self.cfg.stage_iou_thresh,
                              gap_tol=float(getattr(self.cfg, "gap_tol", 1e-7)), solver_kwargs=self.solver_kwargs,
                              compat=self.compat)
        _sync(self.device)
        self.timings["vit"] += t1 - t0
        self.timings["ncut"] += time.perf_counter() - t1
        return out

    def image_masks(self, resized: Sequence[np.ndarray], solver: Optional[str] = None,
                    out_hw: Optional[Tuple[int, int]] = None):
        """(:class:`MaskCutOutput`, ``(B, N, H, W)`` bool disjoint masks as numpy), upsampled from the patch grid
        with nearest neighbour to ``out_hw``: the ``fixed_size`` image the CRF sees (default: the ViT input size,
        the same unless ``fixed_size`` is not a multiple of the patch size)."""
        out = self.patch_masks(resized, solver)
        up = upsample_stage_masks(out.masks, tuple(out_hw) if out_hw else resized[0].shape[:2])
        return out, up.cpu().numpy()


def _pool_init() -> None:
    torch.set_num_threads(1)  # one CRF per process; the main process keeps the cores for ViT/NCut


def make_crf_pool(workers: int) -> Optional[cf.ProcessPoolExecutor]:
    """A process pool of ``workers`` (0 = CPU count) processes; None if ``workers < 0`` (post-processing
    then runs inline, which tests and tiny runs prefer).

    Forked on Linux: a spawned worker re-imports torch (seconds per worker), forked ones start at
    once; the workers never touch CUDA, and torch resets its thread pool in forked children.
    """
    if workers < 0:
        return None
    n = workers or os.cpu_count() or 1
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return cf.ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context(method), initializer=_pool_init)


class _Inline:
    """A finished-future stand-in for inline execution."""

    def __init__(self, fn, *args, **kwargs):
        try:
            self._value, self._exc = fn(*args, **kwargs), None
        except Exception as e:  # noqa: BLE001 - reported per image by the caller
            self._value, self._exc = None, e

    def result(self):
        if self._exc is not None:
            raise self._exc
        return self._value


def _reason_kind(reason: str) -> str:
    return reason.split(" (")[0].split(":")[0].strip()


class ShardProgress:
    """What one shard has done: the writer's chunks and failures, failure counts by reason, the progress bar.

    Every image ends here exactly once, through :meth:`done` or :meth:`fail`.
    """

    def __init__(self, writer: ShardWriter, bar):
        self.writer = writer
        self.bar = bar
        self.reasons: collections.Counter = collections.Counter()

    def done(self, rec: ImageRecord, width: int, height: int, annotations: List[dict]) -> None:
        """Queue ``rec`` (original ``width`` x ``height`` pixels) and its annotations for the next chunk."""
        self.writer.add(rec.id, rec.file_name, width, height, annotations)
        self.bar.update(1)

    def fail(self, rec: ImageRecord, reason: str) -> None:
        """Record ``rec`` as failed with ``reason`` (written to the shard's failures file; the run goes on)."""
        self.writer.add_failure(rec.id, rec.file_name, reason)
        self.reasons[_reason_kind(reason)] += 1
        self.bar.update(1)


class PostprocessQueue:
    """Per-image post-processing in a process pool (inline without one), overlapping the next batches.

    ``fn(*args)`` returns ``(annotations, stats)``; ``account(stats)`` takes the stats of each finished image
    (default: MaskCut's :func:`postprocess_image`, whose CRF and encoding seconds add to ``timings``). Results
    are handed to ``progress`` in submission order; at most ``max_pending`` images wait.
    """

    def __init__(self, pool: Optional[cf.ProcessPoolExecutor], progress: ShardProgress, timings: Dict[str, float],
                 max_pending: int, fn: Callable[..., tuple] = postprocess_image,
                 account: Optional[Callable[[dict], None]] = None):
        self.pool, self.progress, self.timings, self.max_pending = pool, progress, timings, max_pending
        self.fn = fn
        self.account = account or self._add_seconds
        self.pending: collections.deque = collections.deque()

    def _add_seconds(self, t: Dict[str, float]) -> None:
        self.timings["crf"] += t["crf"]
        self.timings["encode"] += t["encode"]

    def submit(self, item: dict, args: tuple) -> None:
        """Queue ``fn(*args)`` for the decoded ``item``."""
        fut = self.pool.submit(self.fn, *args) if self.pool else _Inline(self.fn, *args)
        self.pending.append((item["record"], item["width"], item["height"], fut))

    def drain(self, limit: Optional[int] = None) -> None:
        """Collect finished images until at most ``limit`` (default ``max_pending``) wait."""
        limit = self.max_pending if limit is None else limit
        while len(self.pending) > limit:
            rec, w, h, fut = self.pending.popleft()
            try:
                anns, stats = fut.result()
            except Exception as e:  # noqa: BLE001 - one image's post-processing must not stop the run
                self.progress.fail(rec, f"post-processing failed: {type(e).__name__}: {e}")
                continue
            self.account(stats)
            self.progress.done(rec, w, h, anns)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class BatchRunner(abc.ABC):
    """The batch loop of one shard: each decoded batch computed by :meth:`run_batch` (which queues the
    images' post-processing on ``queue``), then the queue drained.

    Undecodable images are recorded as failed; a batch that raises is retried image by image, so only the image
    that breaks it is recorded (reason ``"<what> failed: ..."``). Loader waits and decoding seconds add to
    ``timings["decode_wait"]`` / ``timings["decode"]``.
    """

    what = "batch"

    def __init__(self, queue: PostprocessQueue, progress: ShardProgress, timings: Dict[str, float]):
        self.queue, self.progress, self.timings = queue, progress, timings

    @abc.abstractmethod
    def run_batch(self, items: List[dict]) -> None:
        """Compute ``items`` (decoded images) and queue their post-processing; may raise."""

    def run(self, loader) -> None:
        """Every batch of ``loader``, then the queue emptied."""
        t_wait = time.perf_counter()
        for batch in loader:
            self.timings["decode_wait"] += time.perf_counter() - t_wait
            good = []
            for it in batch:
                if "error" in it:
                    self.progress.fail(it["record"], it["error"])
                else:
                    self.timings["decode"] += it["decode_s"]
                    good.append(it)
            if good:
                self.run_isolating_failures(good)
            self.queue.drain()
            t_wait = time.perf_counter()
        self.queue.drain(0)

    def run_isolating_failures(self, items: List[dict]) -> None:
        """:meth:`run_batch`; when it raises, each image again alone, recording only the ones that still fail."""
        try:
            self.run_batch(items)
        except Exception as e:  # noqa: BLE001 - isolate the image that breaks the batch
            logger.warning("batch failed (%s: %s); retrying its images one by one", type(e).__name__, e)
            for it in items:
                try:
                    self.run_batch([it])
                except Exception as e1:  # noqa: BLE001
                    self.progress.fail(it["record"], f"{self.what} failed: {type(e1).__name__}: {e1}")


class ShardRunner(BatchRunner):
    """MaskCut's batch loop: masks of a batch on the device, then their post-processing queued."""

    what = "maskcut"

    def __init__(self, cfg, model: MaskCutModel, crf_mode: str, queue: PostprocessQueue, progress: ShardProgress):
        super().__init__(queue, progress, model.timings)
        self.cfg, self.model, self.crf_mode = cfg, model, crf_mode
        self.params = CRFParams()
        self.stage_status: collections.Counter = collections.Counter()

    def run_batch(self, items: List[dict]) -> None:
        """Stage masks of ``items`` (decoded images of one size), their CRF on the device in torch mode, and
        each image's post-processing queued."""
        out, up = self.model.image_masks([it["resized"] for it in items], out_hw=items[0]["image"].shape[:2])
        for s in out.status.flatten().tolist():
            self.stage_status[STATUS_NAMES[s]] += 1
        crf_outs: List[Optional[List[np.ndarray]]] = [None] * len(items)
        if self.crf_mode == "torch":
            crf_outs = _torch_crf(items, up, self.params, self.model.device, self.model.timings)
        for it, masks, crf_out in zip(items, up, crf_outs):
            mode = "precomputed" if crf_out is not None else self.crf_mode
            self.queue.submit(it, (it["image"], masks, it["width"], it["height"], mode, crf_out,
                                   self.cfg.crf_iou_thresh, self.params))


def run_maskcut(cfg, records: Sequence[ImageRecord], out_dir: str, shard_index: int = 0, num_shards: int = 1,
                job_index: Optional[int] = None, progress: bool = True,
                model: Optional[MaskCutModel] = None) -> dict:
    """Run MaskCut over one shard's records, writing chunks under ``out_dir/shards/<shard>/``.

    Resumable: images already in a chunk or in the failures file are skipped. Bad images are
    recorded with their reason and the run continues.

    Returns:
        the shard summary (also written to ``summary.json``): counts, failures by reason, phase
        timings in seconds, throughput.
    """
    from tqdm import tqdm

    t_start = time.perf_counter()
    model = model or MaskCutModel(cfg)
    crf_mode = resolve_crf_mode(cfg.crf, model.device)
    shard_dir = os.path.join(out_dir, "shards", shard_dir_name(shard_index, num_shards, job_index))
    writer = ShardWriter(shard_dir, cfg.chunk_size)
    todo = [r for r in records if not writer.is_done(r.file_name)]
    skipped = len(records) - len(todo)
    if skipped:
        logger.info("resuming %s: %d of %d images already done", shard_dir, skipped, len(records))
    loader = torch.utils.data.DataLoader(MaskCutImages(todo, cfg.fixed_size, cfg.patch_size),
                                         batch_size=max(1, cfg.batch_size), shuffle=False,
                                         num_workers=max(0, min(cfg.num_workers, os.cpu_count() or 1)), collate_fn=collate_items,
                                         persistent_workers=False)
    pool = make_crf_pool(cfg.crf_workers) if len(todo) else None
    max_pending = max(4, 4 * (pool._max_workers if pool else 1), 2 * cfg.batch_size)
    model.timings.clear()
    bar = tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True, smoothing=0.1,
               desc=f"maskcut {shard_index}/{num_shards}")
    shard = ShardProgress(writer, bar)
    queue = PostprocessQueue(pool, shard, model.timings, max_pending)
    runner = ShardRunner(cfg, model, crf_mode, queue, shard)
    try:
        runner.run(loader)
    finally:
        bar.close()
        queue.close()
    wall = time.perf_counter() - t_start
    summary = {
        "shard_index": shard_index, "num_shards": num_shards, "job_index": job_index,
        "images_in_shard": len(records), "skipped_already_done": skipped,
        "processed": writer.num_images, "failed": writer.num_failed, "failed_earlier_runs": writer.failed_before,
        "failures_by_reason": dict(shard.reasons), "annotations": writer.num_annotations,
        "stage_status": dict(runner.stage_status), "crf": crf_mode, "solver": cfg.solver, "compat": model.compat,
        "device": str(model.device),
        "wall_s": wall, "img_per_s": (writer.num_images + writer.num_failed) / wall if wall > 0 else 0.0,
        "phase_s": {k: model.timings.get(k, 0.0) for k in PHASES + ("decode_wait",)},
    }
    writer.close(summary)
    return summary


def _torch_crf(items: List[dict], up: np.ndarray, params: CRFParams, device: torch.device,
               timings: dict) -> List[List[np.ndarray]]:
    """Batched GPU CRF over every non-empty mask of the batch; per image a list of K label maps
    (empty masks get an all-False map, which post-processing skips anyway).

    Each distinct image goes to the device once (``image_index`` maps masks to images), so its lattices
    are built once whatever its number of masks.
    """
    from .torch_crf import torch_crf_refine

    t0 = time.perf_counter()
    which = [(i, k) for i in range(len(items)) for k in range(up.shape[1]) if up[i, k].any()]
    size = items[0]["image"].shape[:2]
    outs = [[np.zeros(size, dtype=bool) for _ in range(up.shape[1])] for _ in items]
    if which:
        used = sorted({i for i, _ in which})
        row = {i: r for r, i in enumerate(used)}
        imgs = torch.from_numpy(np.stack([items[i]["image"] for i in used])).to(device)
        index = torch.tensor([row[i] for i, _ in which], dtype=torch.int64, device=device)
        # bool over the bus (4x fewer bytes than float32), converted on the device
        masks = torch.from_numpy(np.stack([up[i, k] for i, k in which])).to(device).float()
        res = torch_crf_refine(imgs, masks, params, image_index=index).cpu().numpy()
        for (i, k), r in zip(which, res):
            outs[i][k] = r
    _sync(device)
    timings["crf"] += time.perf_counter() - t0
    return outs
