"""Instance embeddings for U2Seg's clustering: one L2-normalised DINO feature per instance, at dataset scale.

Two features (``u2seg.feature``):

* ``"cls"`` (published): the instance's box is cut out of the image, its shortest side resized to
  ``crop_size`` (bilinear) and centre-cropped to a square, and the ViT's CLS token after the final
  LayerNorm is the feature. One ViT input per instance.
* ``"keys"``: the whole image is resized to an ``image_size`` square (as MaskCut does), and the feature is
  the mean of the last block's patch keys weighted by how much of each patch the instance's mask covers
  (its box where it has no mask). One ViT input per image, whatever its number of instances.

Work is batched on the device, decoding and cropping run in DataLoader workers, and results are streamed
to disk (never held for the whole dataset)::

    out_dir/settings.json                                   # feature, ViT, sizes, dim: a resume must match
    out_dir/shards/shard-00003-of-00008/chunk-000012.npz    # ann_ids, image_ids, features, done image ids
    out_dir/shards/shard-00003-of-00008/failures.jsonl      # images that could not be used, with the reason
    out_dir/features.npy, ann_ids.npy, image_ids.npy        # all shards, sorted by annotation id (memmap-able)

A chunk is renamed into place only when complete; a rerun skips every image in a chunk or in the failures
file. Images are split over ranks by position in the id-sorted list (``ids[rank::world]``), as MaskCut
and inference do, so concurrently started ranks agree without talking; whichever rank finds every image
done writes the consolidated arrays.
"""
from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from cutler.utils.image import ImageReadError, read_image_rgb
from cutler.utils.io import atomic_open, atomic_write_json
from cutler.utils.logging import get_logger

logger = get_logger(__name__)

FEATURES = ("cls", "keys")
SETTINGS_FILE = "settings.json"
FEATURES_FILE, ANN_IDS_FILE, IMAGE_IDS_FILE = "features.npy", "ann_ids.npy", "image_ids.npy"


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class InstanceSet:
    """Images and the instances to embed on each.

    images: COCO image entries (``id`` int, ``file_name`` relative to the image root, ``height``, ``width``);
    instances: image id -> list of ``{"id": int, "bbox": [x, y, w, h], "segmentation"?}``.
    """

    images: List[Dict[str, Any]]
    instances: Dict[int, List[Dict[str, Any]]]

    @property
    def num_instances(self) -> int:
        return sum(len(v) for v in self.instances.values())


def load_instance_set(path: os.PathLike | str, images_json: Optional[os.PathLike | str] = None,
                      min_score: float = 0.0, with_masks: bool = True) -> InstanceSet:
    """The instances of a COCO instances file (MaskCut output, a label file) or of a results list.

    Args:
        path: a COCO dict file with ``images`` and ``annotations``, or a JSON list of detection results.
        images_json: for a results list, the COCO file whose ``images`` the results refer to.
        min_score: keep only instances with ``score >= min_score`` (those without a score are kept).
        with_masks: keep the segmentations (the ``"keys"`` feature needs them; ``"cls"`` only the boxes).

    Annotations keep their ``id``; results (which have none) get their 1-based position in the list.

    Raises:
        ValueError: naming the file, for a results list without ``images_json``, non-integer ids, or
            instances on images the file does not list.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, list):
        if images_json is None:
            raise ValueError(f"{path} is a list of detection results: give the COCO file of its images "
                             "(images_json / --images-json)")
        with open(images_json, encoding="utf-8") as f:
            images = json.load(f)["images"]
        anns = [{**r, "id": i + 1} for i, r in enumerate(data)]
    elif isinstance(data, dict) and "images" in data:
        images, anns = data["images"], data.get("annotations", [])
    else:
        raise ValueError(f"{path}: neither a COCO instances file (no 'images') nor a list of results")
    known = set()
    for im in images:
        if not isinstance(im.get("id"), int):
            raise ValueError(f"{path}: image ids must be integers, got {im.get('id')!r}")
        known.add(im["id"])
    instances: Dict[int, List[Dict[str, Any]]] = defaultdict(list)
    for a in anns:
        if a.get("score", 1.0) < min_score:
            continue
        if a["image_id"] not in known:
            raise ValueError(f"{path}: instance {a.get('id')} is on image {a['image_id']}, which is not listed")
        if not isinstance(a.get("id"), int):
            raise ValueError(f"{path}: annotation ids must be integers, got {a.get('id')!r}")
        inst = {"id": a["id"], "bbox": [float(v) for v in a["bbox"]]}
        if with_masks and a.get("segmentation"):
            inst["segmentation"] = a["segmentation"]
        instances[a["image_id"]].append(inst)
    return InstanceSet(list(images), dict(instances))


def box_crop(image: np.ndarray, bbox: Sequence[float], size: int) -> np.ndarray:
    """``(3, size, size)`` uint8: the XYWH box cut out of ``image`` (``(H, W, 3)`` uint8, at least one pixel,
    clamped to the image), its shortest side resized to ``size`` (PIL bilinear; the longer side truncated as
    torchvision's ``Resize(size)``), then centre-cropped to ``size x size`` (torchvision's ``CenterCrop``)."""
    h, w = image.shape[:2]
    x, y, bw, bh = (float(v) for v in bbox)
    x0 = min(max(int(np.floor(x)), 0), w - 1)
    y0 = min(max(int(np.floor(y)), 0), h - 1)
    x1 = min(max(int(np.ceil(x + bw)), x0 + 1), w)
    y1 = min(max(int(np.ceil(y + bh)), y0 + 1), h)
    crop = Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1]))
    cw, ch = crop.size
    if cw <= ch:
        new_w, new_h = size, int(size * ch / cw)
    else:
        new_w, new_h = int(size * cw / ch), size
    crop = np.asarray(crop.resize((new_w, new_h), Image.BILINEAR))
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.ascontiguousarray(crop[top:top + size, left:left + size].transpose(2, 0, 1))


def patch_weights(instances: Sequence[Mapping[str, Any]], height: int, width: int, grid: int) -> np.ndarray:
    """``(n, grid * grid)`` float32: the fraction of each patch of a ``grid x grid`` square resampling of the
    ``height x width`` image that each instance's mask covers (its box when it has no mask, or an empty
    mask), rows summing to > 0."""
    import cv2
    from pycocotools import mask as mask_util

    from cutler.structures.rle import segmentation_to_rle

    out = np.zeros((len(instances), grid * grid), np.float32)
    for i, inst in enumerate(instances):
        m = None
        if inst.get("segmentation"):
            m = mask_util.decode(segmentation_to_rle(inst["segmentation"], height, width))
        if m is None or not m.any():
            m = np.zeros((height, width), np.uint8)
            x, y, bw, bh = inst["bbox"]
            x0, y0 = min(max(int(np.floor(x)), 0), width - 1), min(max(int(np.floor(y)), 0), height - 1)
            m[y0:max(int(np.ceil(y + bh)), y0 + 1), x0:max(int(np.ceil(x + bw)), x0 + 1)] = 1
        out[i] = cv2.resize(m.astype(np.float32), (grid, grid), interpolation=cv2.INTER_AREA).ravel()
        if out[i].sum() <= 0:  # a sliver thinner than the area kernel's precision: its nearest patch
            ys, xs = np.nonzero(m)
            out[i, int(ys.mean() * grid / height) * grid + int(xs.mean() * grid / width)] = 1.0
    return out


class InstanceInputs(torch.utils.data.Dataset):
    """Per image: the ViT inputs of its instances, made in DataLoader workers; never raises for a bad image.

    Items: ``{"image_id", "file_name", "ann_ids": (n,) int64}`` plus ``"crops"`` ``(n, 3, S, S)`` uint8
    (``"cls"``) or ``"image"`` ``(3, S', S')`` uint8 and ``"weights"`` ``(n, P)`` float32 (``"keys"``); or
    ``"error"`` (the reason) instead of the arrays.
    """

    def __init__(self, instance_set: InstanceSet, image_root: os.PathLike | str, feature: str, crop_size: int,
                 image_size: int, patch_size: int):
        from cutler.data.coco import SerializedList

        if feature not in FEATURES:
            raise ValueError(f"unknown u2seg.feature '{feature}', expected one of {FEATURES}")
        # one pickled buffer: forked workers share its pages instead of copying millions of small dicts
        self.items = SerializedList([(im, instance_set.instances.get(im["id"], [])) for im in instance_set.images])
        self.root = Path(image_root)
        self.feature, self.crop_size, self.image_size, self.patch_size = feature, crop_size, image_size, patch_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        im, insts = self.items[i]
        item: Dict[str, Any] = {"image_id": im["id"], "file_name": im["file_name"],
                                "ann_ids": np.asarray([a["id"] for a in insts], dtype=np.int64)}
        if not insts:
            return item  # nothing to embed; recorded as done
        try:
            rgb = read_image_rgb(self.root / im["file_name"])
            if self.feature == "cls":
                item["crops"] = np.stack([box_crop(rgb, a["bbox"], self.crop_size) for a in insts])
            else:
                from cutler.maskcut.dataset import resize_for_maskcut

                _, resized = resize_for_maskcut(rgb, self.image_size, self.patch_size)
                item["image"] = np.ascontiguousarray(resized.transpose(2, 0, 1))
                item["weights"] = patch_weights(insts, rgb.shape[0], rgb.shape[1], resized.shape[0] // self.patch_size)
        except ImageReadError as e:
            item["error"] = e.reason
        except (ValueError, TypeError, KeyError, OSError, MemoryError) as e:  # e.g. a corrupt RLE
            item["error"] = f"{type(e).__name__}: {e}"
        return item


def _collate(items: list) -> list:
    return items


# ------------------------------------------------------------------------------------------- model
class InstanceEmbedder:
    """DINO ViT features of instances on one device.

    Args:
        feature: ``"cls"`` | ``"keys"``; vit_arch, patch_size, pretrain_path, dtype: the ViT
            (:class:`cutler.maskcut.vit.DinoFeatureExtractor`); device: where it runs; batch_size: ViT inputs
            per forward.
    """

    def __init__(self, feature: str = "cls", vit_arch: str = "base", patch_size: int = 8, pretrain_path: str = "",
                 dtype: str = "auto", device: str | torch.device = "cpu", batch_size: int = 64):
        from cutler.maskcut.vit import DinoFeatureExtractor

        self.device = torch.device(device)
        self.feature, self.batch_size = feature, max(1, int(batch_size))
        self.vit = DinoFeatureExtractor(vit_arch, patch_size, "k", pretrain_path, dtype,
                                        "for the U2Seg instance embeddings (no u2seg.pretrain_path given): the clusters "
                                        "are meaningless except for tests and demos").to(self.device)

    @property
    def dim(self) -> int:
        return int(self.vit.vit.embed_dim)

    @torch.no_grad()
    def embed(self, items: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """``(sum n_i, dim)`` float32 L2-normalised features of the instances of ``items`` (in order)."""
        if self.feature == "cls":
            crops = np.concatenate([it["crops"] for it in items])
            out = [self.vit.cls_features(torch.from_numpy(crops[s:s + self.batch_size]).to(self.device))
                   for s in range(0, len(crops), self.batch_size)]
            feats = torch.cat(out)
        else:
            feats_list = []
            for s in range(0, len(items), self.batch_size):
                part = items[s:s + self.batch_size]
                keys = self.vit(torch.from_numpy(np.stack([it["image"] for it in part])).to(self.device))  # (B, P, C)
                for k, it in zip(keys, part):
                    w = torch.from_numpy(it["weights"]).to(self.device)  # (n, P)
                    feats_list.append((w @ k) / w.sum(dim=1, keepdim=True))
            feats = torch.cat(feats_list)
        return torch.nn.functional.normalize(feats.float(), dim=1)


# ------------------------------------------------------------------------------------------ output
def shard_dir(out_dir: os.PathLike | str, shard_index: int, num_shards: int) -> Path:
    from cutler.maskcut.writer import shard_dir_name

    return Path(out_dir) / "shards" / shard_dir_name(shard_index, num_shards)


def _chunk_files(out_dir: Path) -> List[Path]:
    return sorted((out_dir / "shards").glob("*/chunk-*.npz"))


def _failure_files(out_dir: Path) -> List[Path]:
    return sorted((out_dir / "shards").glob("*/failures.jsonl"))


def finished_image_ids(out_dir: os.PathLike | str) -> set:
    """Ids of every image in a committed chunk or recorded as failed, in any shard."""
    from cutler.maskcut.writer import read_failures

    out_dir = Path(out_dir)
    done = set()
    for path in _chunk_files(out_dir):
        with np.load(path) as z:
            done.update(int(i) for i in z["done_image_ids"])
    for path in _failure_files(out_dir):
        done.update(int(rec["id"]) for rec in read_failures(path))
    return done


class EmbeddingWriter:
    """Accumulates one shard's features and writes them in atomic chunks of ``chunk_size`` images."""

    def __init__(self, directory: Path, chunk_size: int, dim: int):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.chunk_size, self.dim = max(1, int(chunk_size)), dim
        existing = sorted(self.dir.glob("chunk-*.npz"))
        self.next_chunk = 1 + max((int(p.stem.split("-")[1]) for p in existing), default=-1)
        self._done: List[int] = []
        self._ann: List[np.ndarray] = []
        self._img: List[np.ndarray] = []
        self._feat: List[np.ndarray] = []
        self.num_images = self.num_instances = self.num_failed = 0
        self._failures = open(self.dir / "failures.jsonl", "a", encoding="utf-8")

    def add(self, image_id: int, ann_ids: np.ndarray, features: np.ndarray) -> None:
        self._done.append(int(image_id))
        self._ann.append(ann_ids.astype(np.int64))
        self._img.append(np.full(len(ann_ids), image_id, np.int64))
        self._feat.append(features.astype(np.float32).reshape(-1, self.dim))
        self.num_images += 1
        self.num_instances += len(ann_ids)
        if len(self._done) >= self.chunk_size:
            self.flush()

    def add_failure(self, image_id: int, file_name: str, reason: str) -> None:
        """Record an unusable image at once (fsynced): a rerun skips it."""
        from cutler.maskcut.writer import append_failure

        append_failure(self._failures, image_id, file_name, reason)
        self.num_failed += 1

    def flush(self) -> None:
        if not self._done:
            return
        with atomic_open(self.dir / f"chunk-{self.next_chunk:06d}.npz", "wb") as f:
            np.savez(f, done_image_ids=np.asarray(self._done, np.int64), ann_ids=np.concatenate(self._ann),
                     image_ids=np.concatenate(self._img), features=np.concatenate(self._feat))
        self.next_chunk += 1
        self._done, self._ann, self._img, self._feat = [], [], [], []

    def close(self, summary: Optional[Dict[str, Any]] = None) -> None:
        self.flush()
        self._failures.close()
        if summary is not None:
            atomic_write_json(self.dir / "summary.json", summary, indent=1)


def _check_settings(out_dir: Path, settings: Dict[str, Any]) -> None:
    """Write ``settings.json``, or refuse to mix chunks made with other settings into ``out_dir``."""
    path = out_dir / SETTINGS_FILE
    if path.is_file() and _chunk_files(out_dir):
        old = json.loads(path.read_text())
        bad = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if bad:
            changes = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in bad.items())
            raise ValueError(f"{out_dir} holds embeddings made with other settings ({changes}); use another "
                             "output folder or delete it to start over")
        return
    atomic_write_json(path, settings, indent=1)


def embed_instances(instance_set: InstanceSet, image_root: os.PathLike | str, out_dir: os.PathLike | str,
                    cfg: Any, shard_index: int = 0, num_shards: int = 1, progress: bool = True,
                    embedder: Optional[InstanceEmbedder] = None) -> Dict[str, Any]:
    """Embed this shard's images' instances into ``out_dir`` (resumable; see the module docstring).

    Args:
        instance_set: what to embed (:func:`load_instance_set`).
        image_root: folder the image file names are relative to.
        out_dir: the embeddings folder.
        cfg: the ``u2seg`` config section (feature, ViT, sizes, batch_size, num_workers, chunk_size, dtype, device).
        shard_index, num_shards: this process's share of the images.
        embedder: a ready model (default: built from ``cfg``).

    Returns:
        The shard summary: counts, failures by reason, instances per second; and ``"complete"``: whether
        every image of every shard is done (then the consolidated arrays have been written).
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if embedder is None:
        device = cfg.device
        if (device or "auto") == "auto" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
            device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
        from cutler.utils.device import resolve_device

        embedder = InstanceEmbedder(cfg.feature, cfg.vit_arch, cfg.patch_size, cfg.pretrain_path, cfg.dtype,
                                    resolve_device(device), cfg.batch_size)
    settings = {"feature": cfg.feature, "vit_arch": cfg.vit_arch, "patch_size": int(cfg.patch_size),
                "pretrain_path": str(cfg.pretrain_path), "dim": embedder.dim,
                "crop_size" if cfg.feature == "cls" else "image_size":
                    int(cfg.crop_size if cfg.feature == "cls" else cfg.image_size)}
    _check_settings(out_dir, settings)
    ordered = sorted(instance_set.images, key=lambda im: im["id"])
    shard = ordered[shard_index::num_shards]
    done = finished_image_ids(out_dir)
    todo = [im for im in shard if im["id"] not in done]
    if len(todo) < len(shard):
        logger.info("resuming: %d of %d images of shard %d/%d already done", len(shard) - len(todo), len(shard),
                    shard_index, num_shards)
    writer = EmbeddingWriter(shard_dir(out_dir, shard_index, num_shards), cfg.chunk_size, embedder.dim)
    dataset = InstanceInputs(InstanceSet(todo, instance_set.instances), image_root, cfg.feature, cfg.crop_size,
                             cfg.image_size, cfg.patch_size)
    per_batch = max(1, cfg.batch_size // 4) if cfg.feature == "cls" else max(1, cfg.batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=per_batch, shuffle=False, collate_fn=_collate,
                                         num_workers=max(0, min(int(cfg.num_workers), os.cpu_count() or 1)))
    reasons: Dict[str, int] = defaultdict(int)
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc=f"embed {shard_index}/{num_shards}", disable=not progress)
    try:
        for batch in loader:
            good = [it for it in batch if "error" not in it and len(it["ann_ids"])]
            feats = embedder.embed(good).cpu().numpy() if good else np.zeros((0, embedder.dim), np.float32)
            offsets = np.cumsum([0] + [len(it["ann_ids"]) for it in good])
            rows = {it["image_id"]: feats[a:b] for it, a, b in zip(good, offsets[:-1], offsets[1:])}
            for it in batch:
                if "error" in it:
                    logger.warning("skipping image %s: %s", it["file_name"], it["error"])
                    writer.add_failure(it["image_id"], it["file_name"], it["error"])
                    reasons[it["error"].split(" (")[0].split(":")[0]] += 1
                else:
                    writer.add(it["image_id"], it["ann_ids"], rows.get(it["image_id"], np.zeros((0, embedder.dim))))
            bar.update(len(batch))
    finally:
        bar.close()
        seconds = time.perf_counter() - t0
        summary = {"shard_index": shard_index, "num_shards": num_shards, "images_in_shard": len(shard),
                   "skipped_already_done": len(shard) - len(todo), "images": writer.num_images,
                   "instances": writer.num_instances, "failed": writer.num_failed, "failures_by_reason": dict(reasons),
                   "seconds": round(seconds, 3), "instances_per_s": writer.num_instances / max(seconds, 1e-9)}
        writer.close(summary)
    all_ids = {im["id"] for im in ordered}
    summary["complete"] = finished_image_ids(out_dir) >= all_ids
    if summary["complete"]:
        consolidate(out_dir)
    return summary


def consolidate(out_dir: os.PathLike | str) -> int:
    """Merge every shard's chunks into ``features.npy`` (N, D) float32, ``ann_ids.npy`` and ``image_ids.npy``
    (N,) int64, sorted by annotation id, streaming one chunk at a time into a memory-mapped file.

    An annotation present in two chunks (overlapping runs) is kept once. Returns N.
    """
    out_dir = Path(out_dir)
    chunks = _chunk_files(out_dir)
    ids, where = [], []
    for ci, path in enumerate(chunks):
        with np.load(path) as z:
            ids.append(z["ann_ids"])
            where.append(np.full(len(z["ann_ids"]), ci, np.int64))
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    chunk_of = np.concatenate(where) if where else np.zeros(0, np.int64)
    uniq, first = np.unique(all_ids, return_index=True)  # sorted ids, first occurrence of each
    dim = json.loads((out_dir / SETTINGS_FILE).read_text())["dim"]
    keep_chunk = chunk_of[first]
    tmp = out_dir / f".{FEATURES_FILE}.tmp"
    feats = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(uniq), dim))
    image_ids = np.zeros(len(uniq), np.int64)
    for ci, path in enumerate(chunks):
        with np.load(path) as z:
            sel = keep_chunk == ci
            if not sel.any():
                continue
            pos_in_chunk = {int(a): j for j, a in enumerate(z["ann_ids"])}
            rows = np.asarray([pos_in_chunk[int(a)] for a in uniq[sel]], np.int64)
            feats[sel] = z["features"][rows]
            image_ids[sel] = z["image_ids"][rows]
    feats.flush()
    del feats
    for name, arr in ((ANN_IDS_FILE, uniq.astype(np.int64)), (IMAGE_IDS_FILE, image_ids)):
        with atomic_open(out_dir / name, "wb") as f:
            np.save(f, arr)
    os.replace(tmp, out_dir / FEATURES_FILE)  # last: its presence means the consolidation is complete
    logger.info("embeddings: %d instances x %d dims from %d chunks -> %s", len(uniq), dim, len(chunks),
                out_dir / FEATURES_FILE)
    return int(len(uniq))


def load_embeddings(out_dir: os.PathLike | str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ann_ids (N,), image_ids (N,), features (N, D) float32 memmap)`` of a consolidated folder.

    Raises:
        FileNotFoundError: the folder has not been consolidated (some shard still running?).
    """
    out_dir = Path(out_dir)
    missing = [n for n in (FEATURES_FILE, ANN_IDS_FILE, IMAGE_IDS_FILE) if not (out_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{out_dir} has no consolidated embeddings ({', '.join(missing)} missing): "
                                "every shard must finish first")
    return (np.load(out_dir / ANN_IDS_FILE), np.load(out_dir / IMAGE_IDS_FILE),
            np.load(out_dir / FEATURES_FILE, mmap_mode="r"))


def iter_failures(out_dir: os.PathLike | str) -> Iterator[Dict[str, Any]]:
    """Every recorded image failure of every shard."""
    from cutler.maskcut.writer import read_failures

    for path in _failure_files(Path(out_dir)):
        yield from read_failures(path)
