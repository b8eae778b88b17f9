"""The batched MaskCut driver: decode (DataLoader workers) -> ViT (device, batched) -> NCut (device,
batched) -> CRF + encoding (process pool, overlapping the next batches) -> atomic chunk writer."""
from __future__ import annotations

import collections
import concurrent.futures as cf
import multiprocessing as mp
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

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


def torch_crf_available() -> bool:
    """True if :mod:`cutler.maskcut.torch_crf` imports and provides ``torch_crf_refine``."""
    try:
        from .torch_crf import torch_crf_refine  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_crf_mode(mode: str, device: torch.device) -> str:
    """``"pydensecrf"`` | ``"torch"`` | ``"none"``; ``"auto"`` = torch on CUDA when its module imports,
    else pydensecrf."""
    mode = (mode or "auto").lower()
    if mode == "auto":
        return "torch" if device.type == "cuda" and torch_crf_available() else "pydensecrf"
    if mode not in ("pydensecrf", "torch", "none"):
        raise ValueError(f"unknown maskcut.crf '{mode}', expected pydensecrf | torch | none | auto")
    if mode == "torch" and not torch_crf_available():
        raise ImportError("maskcut.crf=torch needs cutler.maskcut.torch_crf.torch_crf_refine, which does not import")
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
    device = model.device
    crf_mode = resolve_crf_mode(cfg.crf, device)
    params = CRFParams()
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
    pending: collections.deque = collections.deque()
    reasons: collections.Counter = collections.Counter()
    stage_status: collections.Counter = collections.Counter()
    timings = model.timings
    timings.clear()
    bar = tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True, smoothing=0.1,
               desc=f"maskcut {shard_index}/{num_shards}")

    def fail(rec: ImageRecord, reason: str) -> None:
        writer.add_failure(rec.id, rec.file_name, reason)
        reasons[_reason_kind(reason)] += 1
        bar.update(1)

    def drain(limit: int) -> None:
        while len(pending) > limit:
            rec, w, h, fut = pending.popleft()
            try:
                anns, t = fut.result()
            except Exception as e:  # noqa: BLE001 - one image's post-processing must not stop the run
                fail(rec, f"post-processing failed: {type(e).__name__}: {e}")
                continue
            timings["crf"] += t["crf"]
            timings["encode"] += t["encode"]
            writer.add(rec.id, rec.file_name, w, h, anns)
            bar.update(1)

    def submit(item: dict, masks: np.ndarray, crf_out: Optional[List[np.ndarray]]) -> None:
        mode = "precomputed" if crf_out is not None else crf_mode
        args = (item["image"], masks, item["width"], item["height"], mode, crf_out, cfg.crf_iou_thresh, params)
        fut = pool.submit(postprocess_image, *args) if pool else _Inline(postprocess_image, *args)
        pending.append((item["record"], item["width"], item["height"], fut))

    def run_batch(items: List[dict]) -> None:
        out, up = model.image_masks([it["resized"] for it in items], out_hw=items[0]["image"].shape[:2])
        for s in out.status.flatten().tolist():
            stage_status[STATUS_NAMES[s]] += 1
        crf_outs: List[Optional[List[np.ndarray]]] = [None] * len(items)
        if crf_mode == "torch":
            crf_outs = _torch_crf(items, up, params, device, timings)
        for it, m, c in zip(items, up, crf_outs):
            submit(it, m, c)

    t_wait = time.perf_counter()
    try:
        for batch in loader:
            timings["decode_wait"] += time.perf_counter() - t_wait
            good = []
            for it in batch:
                if "error" in it:
                    fail(it["record"], it["error"])
                else:
                    timings["decode"] += it["decode_s"]
                    good.append(it)
            if good:
                try:
                    run_batch(good)
                except Exception as e:  # noqa: BLE001 - isolate the image that breaks the batch
                    logger.warning("batch failed (%s: %s); retrying its images one by one", type(e).__name__, e)
                    for it in good:
                        try:
                            run_batch([it])
                        except Exception as e1:  # noqa: BLE001
                            fail(it["record"], f"maskcut failed: {type(e1).__name__}: {e1}")
            drain(max_pending)
            t_wait = time.perf_counter()
        drain(0)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    wall = time.perf_counter() - t_start
    summary = {
        "shard_index": shard_index, "num_shards": num_shards, "job_index": job_index,
        "images_in_shard": len(records), "skipped_already_done": skipped,
        "processed": writer.num_images, "failed": writer.num_failed, "failed_earlier_runs": writer.failed_before,
        "failures_by_reason": dict(reasons), "annotations": writer.num_annotations,
        "stage_status": dict(stage_status), "crf": crf_mode, "solver": cfg.solver, "compat": model.compat,
        "device": str(device),
        "wall_s": wall, "img_per_s": (writer.num_images + writer.num_failed) / wall if wall > 0 else 0.0,
        "phase_s": {k: timings.get(k, 0.0) for k in PHASES + ("decode_wait",)},
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
