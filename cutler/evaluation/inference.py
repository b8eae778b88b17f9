"""Running a detector over a dataset: batched, sharded over ranks, streamed to disk, resumable.

Layout under ``output_dir``::

    chunks/r0003_000012.results.json   # detections of one chunk (COCO results list)
    chunks/r0003_000012.done.json      # {"image_ids": [...], "failures": [...]}: the chunk's commit mark
    coco_instances_results.json        # all chunks merged (written once every image is done)
    failures.json                      # images that could not be read, with the reason

A chunk counts only once its ``done`` file exists; both files are written atomically, results first,
so a killed run leaves at most an orphan results file, which is ignored. A rerun skips every image
named in a ``done`` file (also images recorded as failures), whatever world size wrote it.

Images are sharded by position in the id-sorted list (``ids[rank::world_size]``) *before* finished
images are removed, so concurrently starting ranks agree on their shards without talking.
"""
from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.mapper import resize_uint8, shortest_edge_size
from ..structures.rle import encode_masks
from ..utils.image import ImageReadError, read_image_rgb
from ..utils.io import atomic_open, atomic_write_json
from ..utils.logging import get_logger, get_rank, get_world_size

logger = get_logger(__name__)

RESULTS_FILE = "coco_instances_results.json"
META_FILE = "inference_settings.json"
FAILURES_FILE = "failures.json"
_CHUNK_RE = re.compile(r"^r(\d+)_(\d+)\.done\.json$")


# ------------------------------------------------------------------------------------ preprocessing
def prepare_input(image: np.ndarray, min_size: int, max_size: int) -> Dict[str, Any]:
    """One model input from an ``(H, W, 3)`` uint8 RGB array, resized as Detectron2's test-time
    ResizeShortestEdge (:func:`~cutler.data.mapper.shortest_edge_size`, PIL bilinear).

    Returns:
        ``{"image": Tensor[3, h, w] uint8 RGB (resized), "height": H, "width": W}``.
    """
    h, w = image.shape[:2]
    nh, nw = shortest_edge_size(h, w, min_size, max_size)
    image = resize_uint8(image, nh, nw)  # PIL bilinear, as Detectron2's test-time ResizeShortestEdge
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return {"image": tensor, "height": h, "width": w}


# ----------------------------------------------------------------------------------- result format
def instances_to_coco_results(instances: Mapping[str, Any], image_id: Any, max_dets: int = 100,
                              with_masks: bool = True, category_id: Optional[int] = 1) -> List[Dict[str, Any]]:
    """A model's per-image output -> COCO detection results.

    Args:
        instances: ``{"boxes": [N,4] XYXY pixels, "scores": [N], "masks": [N,H,W] bool (optional),
            "classes": [N] (with ``category_id=None``)}`` as tensors or arrays, in the original image's pixels.
        image_id: the dataset's image id.
        max_dets: keep the ``max_dets`` highest scores.
        with_masks: also encode ``masks`` as RLE ``segmentation`` (when present).
        category_id: the category of every detection (class-agnostic); None = each detection's class + 1
            (class-aware models trained on categories 1..K, such as U2Seg's clusters).

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score", "segmentation"?}]``.
    """
    def arr(x):
        return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)

    boxes = arr(instances["boxes"]).reshape(-1, 4).astype(np.float64)
    scores = arr(instances["scores"]).reshape(-1).astype(np.float64)
    order = np.argsort(-scores, kind="stable")[:max_dets]
    masks = instances.get("masks") if with_masks else None
    rles = encode_masks(arr(masks)[order]) if masks is not None else None
    cats = arr(instances["classes"]).reshape(-1).astype(np.int64) + 1 if category_id is None else None
    out = []
    for j, i in enumerate(order):
        x0, y0, x1, y1 = boxes[i]
        r = {"image_id": image_id, "category_id": int(cats[i]) if cats is not None else category_id,
             "bbox": [round(float(x0), 3), round(float(y0), 3), round(float(x1 - x0), 3), round(float(y1 - y0), 3)],
             "score": round(float(scores[i]), 5)}
        if rles is not None:
            r["segmentation"] = rles[j]
        out.append(r)
    return out


# --------------------------------------------------------------------------------------- data input
class ImageListDataset(torch.utils.data.Dataset):
    """COCO image entries -> model inputs; unreadable images become ``{"image_id", "error"}`` records."""

    def __init__(self, images: Sequence[Mapping[str, Any]], image_root: os.PathLike | str, min_size: int,
                 max_size: int):
        self.images = list(images)
        self.image_root = Path(image_root)
        self.min_size, self.max_size = min_size, max_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        img = self.images[i]
        try:
            rgb = read_image_rgb(self.image_root / img["file_name"])
        except ImageReadError as e:
            return {"image_id": img["id"], "file_name": img["file_name"], "error": e.reason}
        item = prepare_input(rgb, self.min_size, self.max_size)
        item["image_id"] = img["id"]
        item["file_name"] = img["file_name"]
        return item


def _collate(batch):
    return batch


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# ------------------------------------------------------------------------------------------- chunks
def finished_chunks(output_dir: os.PathLike | str) -> List[Tuple[Path, Path]]:
    """``(done_file, results_file)`` of every committed chunk under ``output_dir/chunks``, sorted by name."""
    chunk_dir = Path(output_dir) / "chunks"
    if not chunk_dir.is_dir():
        return []
    out = []
    for p in sorted(chunk_dir.iterdir()):
        if _CHUNK_RE.match(p.name):
            out.append((p, p.with_name(p.name[: -len(".done.json")] + ".results.json")))
    return out


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def finished_image_ids(output_dir: os.PathLike | str) -> set:
    """Ids of every image in a committed chunk (including images recorded as failures)."""
    done = set()
    for done_file, _ in finished_chunks(output_dir):
        done.update(_read_json(done_file)["image_ids"])
    return done


def iter_chunk_results(output_dir: os.PathLike | str) -> Iterator[Tuple[List[Any], List[Dict[str, Any]], List[Dict]]]:
    """Yield ``(image_ids, results, failures)`` per committed chunk, first chunk first, without merging.

    An image that appears in more than one chunk (two runs raced on it) is yielded only the first time.
    Large prediction sets (self-training on ImageNet) can be consumed this way chunk by chunk.
    """
    seen: set = set()
    for done_file, results_file in finished_chunks(output_dir):
        done = _read_json(done_file)
        ids = [i for i in done["image_ids"] if i not in seen]
        keep = set(ids)
        seen.update(keep)
        results = [r for r in _read_json(results_file) if r["image_id"] in keep] if keep else []
        failures = [f for f in done.get("failures", []) if f["image_id"] in keep]
        yield ids, results, failures


def merge_chunks(output_dir: os.PathLike | str) -> Path:
    """Stream every committed chunk into ``output_dir/coco_instances_results.json`` (atomically).

    Also writes ``failures.json``. Returns the results path.
    """
    output_dir = Path(output_dir)
    path = output_dir / RESULTS_FILE
    failures: List[Dict] = []
    n = 0
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for _, results, fails in iter_chunk_results(output_dir):
            failures.extend(fails)
            for r in results:
                f.write(("," if n else "") + json.dumps(r, separators=(",", ":")))
                n += 1
        f.write("]")
    atomic_write_json(output_dir / FAILURES_FILE, failures, indent=1)
    logger.info("merged %d detections into %s (%d unreadable images)", n, path, len(failures))
    return path


def _next_seq(output_dir: Path, rank: int) -> int:
    seqs = [int(m.group(2)) for p, _ in finished_chunks(output_dir) if (m := _CHUNK_RE.match(p.name)) and int(m.group(1)) == rank]
    # orphan results files (killed between the two writes) keep their number: never reuse it
    for p in (output_dir / "chunks").glob(f"r{rank:04d}_*.results.json"):
        seqs.append(int(p.name.split("_")[1].split(".")[0]))
    return max(seqs, default=-1) + 1


def _write_chunk(output_dir: Path, rank: int, seq: int, image_ids: List[Any], results: List[Dict],
                 failures: List[Dict]) -> None:
    stem = output_dir / "chunks" / f"r{rank:04d}_{seq:06d}"
    with atomic_open(stem.with_name(stem.name + ".results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, separators=(",", ":"))
    atomic_write_json(stem.with_name(stem.name + ".done.json"), {"image_ids": image_ids, "failures": failures})


def _check_settings(output_dir: Path, settings: Dict[str, Any], resume: bool) -> bool:
    """Refuse to resume chunks made with other settings (mixing them would corrupt the results).

    Another test size, ``max_dets`` or image count, or masks wanted where the chunks have none, raises
    ``ValueError``. Chunks with masks are resumed with masks even for a box-only run, so every chunk
    of a folder stays alike. The first run writes ``inference_settings.json``.

    Returns:
        whether this run must encode masks.
    """
    path = output_dir / META_FILE
    if resume and path.is_file() and finished_chunks(output_dir):
        old = _read_json(path)
        # keys of either side: an option recorded only when set (class_aware) must match in both directions
        keys = list(settings) + [k for k in old if k not in settings]
        bad = [k for k in keys if k != "with_masks" and old.get(k) != settings.get(k)]
        if settings["with_masks"] and not old.get("with_masks"):
            bad.append("with_masks")
        if bad:
            changes = ", ".join(f"{k}: {old.get(k)} -> {settings.get(k)}" for k in bad)
            raise ValueError(f"{output_dir} holds results made with other settings ({changes}); use another "
                             f"output folder, or resume=False (eval.resume=false) to start over")
        return bool(old.get("with_masks"))
    atomic_write_json(path, settings, indent=1)
    return settings["with_masks"]


# ---------------------------------------------------------------------------------------- inference
@dataclass
class InferencePlan:
    """This rank's share of an inference run: which images remain, and what the run settled on."""

    output_dir: Path
    rank: int
    world_size: int
    todo: List[Mapping[str, Any]]  # this rank's images not in a committed chunk, in id order
    all_ids: set  # every image id of the dataset (the merge waits for all of them)
    with_masks: bool  # masks are encoded (as the folder's earlier chunks, see _check_settings)
    class_aware: bool = False  # category_id = predicted class + 1 (settings["class_aware"]), else 1 for all


def plan_inference(images: Sequence[Mapping[str, Any]], output_dir: os.PathLike | str, settings: Dict[str, Any],
                   resume: bool, rank: int, world_size: int) -> InferencePlan:
    """Prepare ``output_dir`` and list this rank's remaining images.

    Without ``resume``, rank 0 deletes previous chunks first (all ranks wait for it under torch.distributed).
    Images are sharded by position in the id-sorted list before finished ones are dropped, so ranks agree
    on their shards without talking.

    Raises:
        ValueError: duplicate image ids, or chunks made with other ``settings`` (see :func:`_check_settings`).
    """
    output_dir = Path(output_dir)
    (output_dir / "chunks").mkdir(parents=True, exist_ok=True)
    if not resume and rank == 0:
        for p in (output_dir / "chunks").iterdir():
            p.unlink()
    if _dist_ready() and not resume:
        torch.distributed.barrier()
    with_masks = _check_settings(output_dir, settings, resume)
    ordered = sorted(images, key=lambda im: (str(type(im["id"])), im["id"]))
    all_ids = {im["id"] for im in ordered}
    if len(all_ids) != len(ordered):
        raise ValueError("image ids are not unique")
    shard = ordered[rank::world_size]
    done = finished_image_ids(output_dir) if resume else set()
    todo = [im for im in shard if im["id"] not in done]
    if len(todo) < len(shard):
        logger.info("resuming: %d of %d images of shard %d/%d already done", len(shard) - len(todo), len(shard),
                    rank, world_size)
    return InferencePlan(output_dir, rank, world_size, todo, all_ids, with_masks,
                         bool(settings.get("class_aware", False)))


class ChunkWriter:
    """Collects results and commits them as a chunk every ``chunk_size`` images (see the module docstring)."""

    def __init__(self, output_dir: Path, rank: int, chunk_size: int):
        self.output_dir, self.rank, self.chunk_size = output_dir, rank, chunk_size
        self.seq = _next_seq(output_dir, rank)
        self.committed = 0  # images in chunks written by this writer
        self._ids: List[Any] = []
        self._results: List[Dict[str, Any]] = []
        self._failures: List[Dict[str, Any]] = []

    def add(self, image_ids: Sequence[Any], results: Sequence[Dict[str, Any]], failures: Sequence[Dict[str, Any]]
            ) -> None:
        """Record a batch (every image id, readable or not); commits once ``chunk_size`` images are held."""
        self._ids.extend(image_ids)
        self._results.extend(results)
        self._failures.extend(failures)
        if len(self._ids) >= self.chunk_size:
            self.commit()

    def commit(self) -> None:
        """Write what is held as the next chunk (nothing when empty)."""
        if not self._ids:
            return
        _write_chunk(self.output_dir, self.rank, self.seq, self._ids, self._results, self._failures)
        self.seq, self.committed = self.seq + 1, self.committed + len(self._ids)
        self._ids, self._results, self._failures = [], [], []


def predict_batch(model: Callable, batch: Sequence[Dict[str, Any]], max_dets: int, with_masks: bool,
                  class_aware: bool = False) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """COCO results of the readable images of ``batch`` and failure records of the unreadable ones
    (``category_id`` = predicted class + 1 when ``class_aware``, else 1)."""
    good = [b for b in batch if "error" not in b]
    failures = []
    for b in batch:
        if "error" in b:
            logger.warning("skipping unreadable image %s: %s", b["file_name"], b["error"])
            failures.append({"image_id": b["image_id"], "file_name": b["file_name"], "reason": b["error"]})
    results: List[Dict[str, Any]] = []
    if good:
        with torch.inference_mode():
            outputs = model([{k: b[k] for k in ("image", "height", "width")} for b in good])
        for b, out in zip(good, outputs):
            results.extend(instances_to_coco_results(out["instances"], b["image_id"], max_dets, with_masks,
                                                     None if class_aware else 1))
    return results, failures


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """``model`` in eval mode for the block (a ``torch.nn.Module``'s training flag is restored after)."""
    was_training = bool(getattr(model, "training", False))
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        yield
    finally:
        if isinstance(model, torch.nn.Module):
            model.train(was_training)


def _run_shard(model: Callable, plan: InferencePlan, image_root: os.PathLike | str, *, min_size: int, max_size: int,
               batch_size: int, num_workers: int, chunk_size: int, max_dets: int, progress: bool) -> int:
    """The batch loop over ``plan.todo``; returns the number of images committed."""
    from tqdm import tqdm

    writer = ChunkWriter(plan.output_dir, plan.rank, chunk_size)
    # one loader for the whole shard (workers start once); a chunk is committed every chunk_size images
    loader = torch.utils.data.DataLoader(
        ImageListDataset(plan.todo, image_root, min_size, max_size), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, collate_fn=_collate)
    bar = tqdm(total=len(plan.todo), desc=f"inference {plan.output_dir.name}", disable=not progress or plan.rank != 0)
    for batch in loader:
        results, failures = predict_batch(model, batch, max_dets, plan.with_masks, plan.class_aware)
        writer.add([b["image_id"] for b in batch], results, failures)
        bar.update(len(batch))
    writer.commit()
    bar.close()
    return writer.committed


def finalise_inference(plan: InferencePlan, n_done: int) -> Optional[Path]:
    """Merge the chunks once every image of the dataset is done (on rank 0 after a barrier under
    torch.distributed); the merged file, or None while shards are missing (and on ranks other than 0)."""
    output_dir = plan.output_dir
    if _dist_ready():
        torch.distributed.barrier()
        if plan.rank != 0:
            return None
    if finished_image_ids(output_dir) >= plan.all_ids:
        merged = output_dir / RESULTS_FILE
        chunks = finished_chunks(output_dir)
        if n_done == 0 and merged.is_file() and merged.stat().st_mtime >= max(p.stat().st_mtime for p, _ in chunks):
            return merged  # nothing new since the last merge
        return merge_chunks(output_dir)
    logger.info("rank %d finished its shard; other shards are still running (no merge yet)", plan.rank)
    return None


def run_inference(
    model: Callable[[List[Dict[str, Any]]], List[Dict[str, Any]]],
    images: Sequence[Mapping[str, Any]],
    image_root: os.PathLike | str,
    output_dir: os.PathLike | str,
    *,
    min_size: int = 800,
    max_size: int = 1333,
    batch_size: int = 2,
    num_workers: int = 0,
    chunk_size: int = 500,
    max_dets: int = 100,
    with_masks: bool = True,
    class_aware: bool = False,
    resume: bool = True,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    progress: bool = True,
) -> Optional[Path]:
    """Run ``model`` over ``images`` and write COCO results (see the module docstring for the layout).

    Args:
        model: eval-mode callable following the detector interface: a list of
            ``{"image": Tensor[3,h,w] uint8, "height", "width"}`` -> a list of ``{"instances": {...}}``.
            ``torch.nn.Module``\\ s are put in eval mode for the run and restored afterwards.
        images: COCO image entries (``id``, ``file_name`` relative to ``image_root``).
        output_dir: where chunks and the merged results go.
        min_size, max_size: test-time resize (shortest edge, longest-edge cap).
        batch_size: images per model call.
        num_workers: image decoding workers (DataLoader).
        chunk_size: images per committed chunk (what a killed run can lose).
        max_dets: detections kept per image (highest scores).
        with_masks: encode predicted masks as RLE.
        class_aware: each detection's ``category_id`` is its predicted class + 1 (else 1 for all).
        resume: skip images in committed chunks; ``False`` deletes previous chunks first.
        rank, world_size: this process's shard; default from torch.distributed or the environment.
        progress: tqdm bar on rank 0.

    Returns:
        Path of the merged results file when every image of the dataset is done (the merge happens on
        rank 0 after a barrier under torch.distributed, otherwise in whichever process finishes last),
        else ``None``.
    """
    if rank is None or world_size is None:
        rank, world_size = get_rank(), get_world_size()
    settings = {"min_size": min_size, "max_size": max_size, "max_dets": max_dets, "with_masks": with_masks,
                "num_images": len(images)}
    if class_aware:  # recorded only when set, so folders written before the option resume as they were
        settings["class_aware"] = True
    plan = plan_inference(images, output_dir, settings, resume, rank, world_size)
    t0 = time.perf_counter()
    with _eval_mode(model):
        n_done = _run_shard(model, plan, image_root, min_size=min_size, max_size=max_size, batch_size=batch_size,
                            num_workers=num_workers, chunk_size=chunk_size, max_dets=max_dets, progress=progress)
    if n_done:
        dt = time.perf_counter() - t0
        logger.info("rank %d: %d images in %.1fs (%.2f img/s)", rank, n_done, dt, n_done / max(dt, 1e-9))
    return finalise_inference(plan, n_done)
