"""UnSAM's divide-and-conquer pseudo-masks over a dataset: batched on the device, resumable, sharded.

Per batch of images (each resized to ``S x S``, ``S = unsam.divide.image_size``):

1. **divide** - the detector on the batch; masks scoring ``> unsam.divide.score_thresh`` are divide masks;
2. **conquer** - every divide mask's tight box is cropped from its image and resized to ``crop_size`` squares
   in one ``roi_align`` call (bilinear, averaging when shrinking), DINO keys of all crops are computed in
   batches, and :func:`cutler.unsam.merging.iterative_merge` merges adjacent patch clusters of all crops at
   once;
3. **merge** - per image (:mod:`cutler.unsam.postprocess`, in a process pool unless the CRF runs on the device):
   parts back to the frame, mask NMS, dense-CRF refinement, filtering, annotations with ``level``/``parent``.

Outputs go through MaskCut's chunk writer (:class:`cutler.maskcut.writer.ShardWriter`): atomic chunks, failed
images recorded with their reason, reruns skip finished images, and :func:`cutler.maskcut.writer.merge_outputs`
joins the shards into one COCO JSON (renumbering ``parent`` with the ids).
"""
from __future__ import annotations

import collections
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..data.mapper import resize_uint8
from ..maskcut.dataset import DecodedImages, ImageRecord, collate_items
from ..maskcut.pipeline import BatchRunner, PostprocessQueue, ShardProgress, make_crf_pool, resolve_crf_mode
from ..maskcut.vit import DinoFeatureExtractor
from ..maskcut.writer import ShardWriter, shard_dir_name
from ..structures.masks import masks_to_boxes
from ..structures.rle import encode_masks
from ..utils.device import resolve_device
from ..utils.logging import get_logger
from .merging import check_thresholds, iterative_merge
from .postprocess import ImageHierarchy, MergeSettings, build_candidates, postprocess_image

logger = get_logger(__name__)

PHASES = ("decode", "divide", "crop", "vit", "merge", "postprocess")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SquareImages(DecodedImages):
    """Items with ``image``: the decoded image resized to ``size x size`` (PIL bilinear, as the detector's
    test-time resize); see :class:`cutler.maskcut.dataset.DecodedImages`."""

    def __init__(self, records: Sequence[ImageRecord], size: int):
        super().__init__(records)
        self.size = int(size)

    def prepare(self, rgb: np.ndarray) -> dict:
        return {"image": np.ascontiguousarray(resize_uint8(rgb, self.size, self.size))}


def build_divide_detector(ucfg, device: torch.device):
    """The divide detector of ``unsam.divide`` in eval mode, its weights loaded with strictness ``"shapes"``
    (random weights, with a loud warning, when ``unsam.divide.weights`` is empty)."""
    from ..config import load_config
    from ..modeling.build import build_model_with_weights

    d = ucfg.divide
    dcfg = load_config(d.detector_config, list(d.detector_overrides))
    if not bool(dcfg.model.mask_on):
        raise ValueError(f"unsam.divide.detector_config {d.detector_config} has model.mask_on=false: the divide "
                         "step needs a detector that predicts masks")
    if not d.weights:
        logger.warning("!" * 80)
        logger.warning("unsam.divide.weights is empty: the divide detector is RANDOMLY INITIALISED and its masks are "
                       "noise (give a trained CutLER detector for real pseudo-masks)")
        logger.warning("!" * 80)
    return build_model_with_weights(dcfg, d.weights, "shapes", device=device).eval()


class DivideConquerModel:
    """The device part of UnSAM's pseudo-mask generator for one configuration.

    Args:
        ucfg: the ``unsam`` section of a config.
        device: overrides ``ucfg.device``.
        detector: a ready detector (default: :func:`build_divide_detector`).
    """

    def __init__(self, ucfg, device: Optional[torch.device] = None, detector=None):
        self.cfg = ucfg
        spec = ucfg.device
        if (spec or "auto") == "auto" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
            spec = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"  # one GPU per torchrun rank
        self.device = device or resolve_device(spec)
        c = ucfg.conquer
        self.thresholds = check_thresholds(c.thresholds)
        if c.crop_size % c.patch_size:
            raise ValueError(f"unsam.conquer.crop_size {c.crop_size} is not a multiple of the patch size {c.patch_size}")
        self.grid = (c.crop_size // c.patch_size,) * 2
        self.detector = detector if detector is not None else build_divide_detector(ucfg, self.device)
        self.extractor = DinoFeatureExtractor(
            c.vit_arch, c.patch_size, "k", c.pretrain_path, c.dtype,
            "for UnSAM's conquer step (no unsam.conquer.pretrain_path given): the parts are meaningless except for "
            "tests and demos").to(self.device)
        self.timings: Dict[str, float] = collections.defaultdict(float)

    @torch.no_grad()
    def divide(self, images: torch.Tensor) -> List[dict]:
        """Detector masks scoring above the threshold.

        Args:
            images: ``(B, 3, S, S)`` uint8 RGB on the device.

        Returns:
            Per image ``{"masks": (n, S, S) bool, "scores": (n,), "boxes": (n, 4) tight XYXY}`` on the device,
            empty masks removed, highest score first.
        """
        s = images.shape[-1]
        outs = self.detector([{"image": im, "height": s, "width": s} for im in images])
        result = []
        for out in outs:
            inst = out["instances"]
            masks = inst["masks"].to(self.device).bool()
            scores = inst["scores"].to(self.device).float()
            keep = scores > float(self.cfg.divide.score_thresh)
            masks, scores = masks[keep], scores[keep]
            boxes, nonempty = masks_to_boxes(masks), masks.flatten(1).any(dim=1)
            order = torch.argsort(scores[nonempty], descending=True, stable=True)
            result.append({"masks": masks[nonempty][order], "scores": scores[nonempty][order],
                           "boxes": boxes[nonempty][order]})
        return result

    @torch.no_grad()
    def conquer(self, images: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        """Merge levels of every box.

        Args:
            images: ``(B, 3, S, S)`` uint8 RGB on the device.
            boxes: ``(K, 4)`` XYXY pixel boxes (exclusive ends) in the ``S x S`` frame.
            image_index: ``(K,)`` int64 image of each box.

        Returns:
            ``(K, L, N)`` int64 cluster ids per level (see :func:`cutler.unsam.merging.iterative_merge`), on CPU.
        """
        from torchvision.ops import roi_align

        c = self.cfg.conquer
        n = self.grid[0] * self.grid[1]
        if len(boxes) == 0:
            return torch.zeros(0, len(self.thresholds), n, dtype=torch.int64)
        t0 = time.perf_counter()
        rois = torch.cat([image_index[:, None].to(boxes), boxes], dim=1)
        # bilinear sampling at the crop's pixel centres; with sampling_ratio 0 a shrinking crop averages
        # ceil(box / crop) samples per pixel, an antialiased resize like PIL's
        crops = roi_align(images.float(), rois, output_size=int(c.crop_size), spatial_scale=1.0, sampling_ratio=0,
                          aligned=True) / 255.0
        _sync(self.device)
        t1 = time.perf_counter()
        feats = torch.cat([self.extractor(crops[i:i + c.vit_batch_size])
                           for i in range(0, len(crops), max(1, int(c.vit_batch_size)))])
        _sync(self.device)
        t2 = time.perf_counter()
        step = max(1, int(c.merge_batch_size))
        labels = torch.cat([iterative_merge(feats[i:i + step], self.grid, self.thresholds).labels.cpu()
                            for i in range(0, len(feats), step)])
        t3 = time.perf_counter()
        self.timings["crop"] += t1 - t0
        self.timings["vit"] += t2 - t1
        self.timings["merge"] += t3 - t2
        return labels

    def __call__(self, images: Sequence[np.ndarray]) -> List[dict]:
        """Divide and conquer a batch of ``(S, S, 3)`` uint8 RGB frames.

        Returns:
            Per image ``{"rles": divide masks as RLE, "scores": [...], "level_labels": [(L, N) array per mask]}``.
        """
        t0 = time.perf_counter()
        x = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2).contiguous()
        divided = self.divide(x)
        _sync(self.device)
        self.timings["divide"] += time.perf_counter() - t0
        boxes = torch.cat([d["boxes"] for d in divided]) if divided else torch.zeros(0, 4)
        index = torch.cat([torch.full((len(d["boxes"]),), i, dtype=torch.int64, device=self.device)
                           for i, d in enumerate(divided)])
        labels = self.conquer(x, boxes, index).numpy()
        out, k = [], 0
        for d in divided:
            masks = d["masks"].cpu().numpy()
            n = len(masks)
            out.append({"rles": encode_masks(masks), "scores": d["scores"].cpu().tolist(), "level_labels": list(labels[k:k + n])})
            k += n
        return out


def _torch_refine(hier: ImageHierarchy, settings: MergeSettings, device: torch.device) -> List[np.ndarray]:
    """The CRF label maps of one image's survivors, computed by the batched torch CRF on ``device``."""
    from ..maskcut.torch_crf import torch_crf_refine

    pairs = hier.crf_inputs()
    if not pairs:
        return []
    imgs = torch.from_numpy(np.stack([p[0] for p in pairs])).to(device)
    masks = torch.from_numpy(np.stack([p[1] for p in pairs])).to(device)
    return list(torch_crf_refine(imgs, masks, settings.crf_params).cpu().numpy())


def merge_image(raw: dict, image: np.ndarray, width: int, height: int, settings: MergeSettings,
                device: Optional[torch.device] = None) -> tuple:
    """The merge step of one image from :meth:`DivideConquerModel.__call__` output: with ``settings.crf`` equal
    to ``"precomputed"`` the CRF runs batched on ``device`` (the torch CRF), otherwise everything runs here
    (:func:`cutler.unsam.postprocess.postprocess_image`). Returns ``(annotations, stats)``."""
    from pycocotools import mask as mask_util

    if settings.crf != "precomputed":
        return postprocess_image(image, width, height, raw["rles"], raw["scores"], raw["level_labels"], settings)
    t0 = time.perf_counter()
    cand, counts = build_candidates([mask_util.decode(x).astype(bool) for x in raw["rles"]], raw["scores"],
                                    raw["level_labels"], settings)
    hier = ImageHierarchy(image, width, height, cand, settings)
    hier.nms()
    t1 = time.perf_counter()
    hier.apply_refinement(_torch_refine(hier, settings, device or torch.device("cpu")))
    t2 = time.perf_counter()
    anns = hier.annotations()
    return anns, {**counts, **hier.stats, "seconds": {"masks": t1 - t0, "crf": t2 - t1,
                                                      "encode": time.perf_counter() - t2}}


def merge_settings(ucfg, device: torch.device) -> MergeSettings:
    """The merge settings of ``ucfg`` on ``device`` (``unsam.merge.crf`` resolved: ``auto`` is the torch CRF on a
    GPU, pydensecrf elsewhere)."""
    mode = resolve_crf_mode(ucfg.merge.crf, device)
    return MergeSettings.from_config(ucfg, "precomputed" if mode == "torch" else mode)


class DivideConquerRunner(BatchRunner):
    """UnSAM's batch loop: divide and conquer a batch on the device, then each image's merge step queued."""

    what = "divide-and-conquer"

    def __init__(self, model: DivideConquerModel, settings: MergeSettings, queue: PostprocessQueue,
                 progress: ShardProgress):
        super().__init__(queue, progress, model.timings)
        self.model, self.settings = model, settings

    def run_batch(self, items: List[dict]) -> None:
        """Divide-and-conquer output of ``items`` (square frames), each image's merge step queued."""
        raw = self.model([it["image"] for it in items])
        if self.settings.crf == "precomputed":  # the torch CRF: the merge step runs here, on the device
            jobs = [(r, it["image"], it["width"], it["height"], self.settings, self.model.device)
                    for it, r in zip(items, raw)]
        else:
            jobs = [(it["image"], it["width"], it["height"], r["rles"], r["scores"], r["level_labels"], self.settings)
                    for it, r in zip(items, raw)]
        # queued only once the whole batch went through the device: a retry image by image adds nothing twice
        for it, args in zip(items, jobs):
            self.queue.submit(it, args)


def run_divide_conquer(ucfg, records: Sequence[ImageRecord], out_dir: str, shard_index: int = 0,
                       num_shards: int = 1, progress: bool = True,
                       model: Optional[DivideConquerModel] = None) -> dict:
    """Pseudo-masks for one shard's records, written as chunks under ``out_dir/shards/<shard>/``.

    Resumable (images already in a chunk or in the failures file are skipped); a bad image is recorded with
    its reason and the run continues.

    Returns:
        The shard summary (also ``summary.json``): counts, masks per level, failures by reason, phase seconds.
    """
    from tqdm import tqdm

    t_start = time.perf_counter()
    model = model or DivideConquerModel(ucfg)
    device = model.device
    settings = merge_settings(ucfg, device)
    crf_mode = "torch" if settings.crf == "precomputed" else settings.crf
    writer = ShardWriter(os.path.join(out_dir, "shards", shard_dir_name(shard_index, num_shards)), ucfg.chunk_size)
    todo = [r for r in records if not writer.is_done(r.file_name)]
    skipped = len(records) - len(todo)
    if skipped:
        logger.info("resuming %s: %d of %d images already done", writer.dir, skipped, len(records))
    loader = torch.utils.data.DataLoader(
        SquareImages(todo, ucfg.divide.image_size), batch_size=max(1, int(ucfg.divide.batch_size)), shuffle=False,
        num_workers=max(0, min(int(ucfg.num_workers), os.cpu_count() or 1)), collate_fn=collate_items)
    pool = make_crf_pool(int(ucfg.merge.workers)) if todo and crf_mode != "torch" else None
    totals: collections.Counter = collections.Counter()
    timings = model.timings
    timings.clear()

    def account(stats: dict) -> None:
        for k, v in stats.items():
            if k == "seconds":
                timings["postprocess"] += sum(v.values())
            else:
                totals[k] += v

    bar = tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True,
               desc=f"divide-conquer {shard_index}/{num_shards}")
    shard = ShardProgress(writer, bar)
    queue = PostprocessQueue(pool, shard, timings, max(4, 4 * (pool._max_workers if pool else 1)),
                             fn=merge_image if crf_mode == "torch" else postprocess_image, account=account)
    try:
        DivideConquerRunner(model, settings, queue, shard).run(loader)
    finally:
        bar.close()
        queue.close()
    wall = time.perf_counter() - t_start
    summary = {
        "shard_index": shard_index, "num_shards": num_shards, "images_in_shard": len(records),
        "skipped_already_done": skipped, "processed": writer.num_images, "failed": writer.num_failed,
        "failures_by_reason": dict(shard.reasons), "annotations": writer.num_annotations, "counts": dict(totals),
        "crf": crf_mode, "device": str(device), "wall_s": wall,
        "img_per_s": (writer.num_images + writer.num_failed) / wall if wall > 0 else 0.0,
        "phase_s": {k: timings.get(k, 0.0) for k in PHASES},
    }
    writer.close(summary)
    return summary


__all__ = ["DivideConquerModel", "DivideConquerRunner", "SquareImages", "build_divide_detector", "merge_image",
           "merge_settings", "run_divide_conquer"]
