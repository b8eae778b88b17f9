"""Panoptic labels: the COCO panoptic format, the things-then-stuff merge, and semantic targets.

**Format** (COCO panoptic, what panopticapi, Detectron2 and torchmetrics users read): per image a PNG whose
RGB pixel encodes a segment id as ``id = R + 256 * G + 256**2 * B`` (0 = void), and a JSON
``{"images", "annotations": [{"image_id", "file_name" (the PNG), "segments_info": [{"id", "category_id",
"iscrowd", "area", "bbox" (XYWH)}]}], "categories": [{"id", "name", "isthing", ...}]}``.

**Pseudo-label categories**: with C thing clusters and S stuff clusters, thing cluster ``c`` keeps category
id ``c`` (1..C) and stuff cluster ``s`` becomes ``C + s`` (C+1..C+S), as the published U2Seg labels.

**Merge rule** (per pixel): the thing label where a thing instance covers it, else the stuff label if it is
not 0, else void. Overlapping instances are painted largest first, so a smaller instance lies on top of a
larger one; an instance left without pixels is dropped. Each stuff cluster present becomes one segment.
``max_stuff_thing_overlap`` (published: 0.7; default 1.0 = off) additionally voids a stuff cluster when more
than that fraction of its pixels lie under things.

**Semantic targets** for the Panoptic FPN branch: 0 for every thing pixel, ``1..S`` for the stuff
categories in increasing id order, 255 for void (Detectron2's "panoptic_separated" convention).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from cutler.utils.io import atomic_write_bytes

VOID = 0
SEM_IGNORE = 255  # semantic target of void pixels


# ------------------------------------------------------------------------------------------ format
def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 panoptic PNG pixels -> ``(H, W)`` int64 segment ids (``R + 256 G + 256^2 B``)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"a panoptic PNG must be RGB (H, W, 3), got shape {rgb.shape}")
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """``(H, W)`` integer segment ids in ``[0, 256^3)`` -> ``(H, W, 3)`` uint8 RGB."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 256 ** 3):
        raise ValueError(f"segment ids must lie in [0, 256^3), got [{ids.min()}, {ids.max()}]")
    return np.stack([ids % 256, ids // 256 % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``(H, W)`` (grey) or ``(H, W, 3)`` (RGB) array."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def write_panoptic_png(path: os.PathLike | str, ids: np.ndarray) -> None:
    """Write segment ids as a COCO panoptic PNG (atomically)."""
    atomic_write_bytes(path, encode_png(id_to_rgb(ids)))


def read_panoptic_png(path: os.PathLike | str) -> np.ndarray:
    """``(H, W)`` int64 segment ids of a COCO panoptic PNG.

    Raises:
        FileNotFoundError: missing file. ValueError: not an RGB PNG (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"panoptic PNG not found: {path}")
    with Image.open(path) as img:
        if img.mode != "RGB":
            raise ValueError(f"{path}: a panoptic PNG must be RGB, got mode {img.mode}")
        return rgb_to_id(np.asarray(img))


def read_label_png(path: os.PathLike | str) -> np.ndarray:
    """``(H, W)`` integer map of a single-channel label PNG (8 or 16 bit).

    Raises:
        FileNotFoundError: missing file. ValueError: a colour PNG (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label PNG not found: {path}")
    with Image.open(path) as img:
        if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise ValueError(f"{path}: a label PNG must be single-channel, got mode {img.mode}")
        return np.asarray(img).astype(np.int64)


def segments_from_ids(ids: np.ndarray, categories: Mapping[int, int], iscrowd: Optional[Mapping[int, int]] = None
                      ) -> List[Dict[str, Any]]:
    """``segments_info`` entries (id, category_id, iscrowd, area, XYWH bbox) for every non-zero id of ``ids``.

    Args:
        ids: ``(H, W)`` segment ids.
        categories: segment id -> category id (every non-zero id present must be a key).
        iscrowd: segment id -> 0/1 (default 0).
    """
    from scipy import ndimage

    values, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(ids.shape)
    slices = ndimage.find_objects(inverse + 1)  # labels 1..len(values) -> one bounding slice each
    out = []
    for k, (value, count) in enumerate(zip(values.tolist(), counts.tolist())):
        if value == VOID:
            continue
        if value not in categories:
            raise KeyError(f"segment id {value} has no category")
        ys, xs = slices[k]
        out.append({"id": int(value), "category_id": int(categories[value]),
                    "iscrowd": int((iscrowd or {}).get(value, 0)), "area": int(count),
                    "bbox": [int(xs.start), int(ys.start), int(xs.stop - xs.start), int(ys.stop - ys.start)]})
    return out


def panoptic_categories(num_things: int, num_stuff: int, thing_names: Optional[Sequence[str]] = None,
                        stuff_names: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """The pseudo-label category list: things ``1..C`` then stuff ``C+1..C+S`` (names default to the ids)."""
    cats = []
    for c in range(1, num_things + 1):
        name = thing_names[c - 1] if thing_names else str(c)
        cats.append({"id": c, "name": name, "supercategory": "thing", "isthing": 1})
    for s in range(1, num_stuff + 1):
        name = stuff_names[s - 1] if stuff_names else f"stuff{s}"
        cats.append({"id": num_things + s, "name": name, "supercategory": "stuff", "isthing": 0})
    return cats


# ------------------------------------------------------------------------------------------- merge
def merge_things_and_stuff(thing_masks: np.ndarray, thing_categories: Sequence[int], stuff: np.ndarray,
                           num_things: int, max_stuff_thing_overlap: float = 1.0
                           ) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """The panoptic pseudo-label of one image (see the module docstring).

    Args:
        thing_masks: ``(N, H, W)`` bool instance masks.
        thing_categories: N thing cluster ids in ``1..num_things``.
        stuff: ``(H, W)`` stuff cluster per pixel, ``0`` = none, ``1..S``.
        num_things: C (stuff cluster ``s`` becomes category ``C + s``).
        max_stuff_thing_overlap: void a stuff cluster when more than this fraction of its pixels is under
            things (1.0: never).

    Returns:
        ``(ids (H, W) int32, segments_info)``: segment ids ``1..n``, things first; ``segments_info`` entries
        hold id, category_id, iscrowd (0), area and bbox.
    """
    thing_masks = np.asarray(thing_masks, dtype=bool)
    stuff = np.asarray(stuff)
    if thing_masks.ndim != 3 or thing_masks.shape[1:] != stuff.shape:
        raise ValueError(f"thing masks {thing_masks.shape} and stuff map {stuff.shape} differ in size")
    if len(thing_categories) != len(thing_masks):
        raise ValueError(f"{len(thing_masks)} thing masks but {len(thing_categories)} categories")
    bad = [c for c in thing_categories if not 1 <= int(c) <= num_things]
    if bad:
        raise ValueError(f"thing categories {bad[:5]} outside 1..{num_things}")
    h, w = stuff.shape
    ids = np.zeros((h, w), np.int32)
    categories: Dict[int, int] = {}
    areas = thing_masks.reshape(len(thing_masks), -1).sum(1)
    # Largest first, so smaller instances are painted over larger ones; ties keep the input order.
    for i in np.argsort(-areas, kind="stable"):
        if areas[i] == 0:
            continue
        seg_id = len(categories) + 1
        ids[thing_masks[i]] = seg_id
        categories[seg_id] = int(thing_categories[i])
    # Drop instances that later (smaller) ones covered entirely, and renumber the survivors 1..k.
    present = np.unique(ids[ids > 0])
    remap = np.zeros(len(categories) + 1, np.int32)
    remap[present] = np.arange(1, len(present) + 1, dtype=np.int32)
    ids = remap[ids]
    categories = {int(remap[k]): v for k, v in categories.items() if remap[k] > 0}
    taken = ids > 0
    labels, counts = np.unique(stuff, return_counts=True)
    for s, total in zip(labels.tolist(), counts.tolist()):
        if s == 0:
            continue
        region = stuff == s
        free = region & ~taken
        n_free = int(free.sum())
        if n_free == 0 or (total - n_free) / total > max_stuff_thing_overlap:
            continue
        seg_id = len(categories) + 1
        ids[free] = seg_id
        categories[seg_id] = num_things + int(s)
    return ids, segments_from_ids(ids, categories)


def panoptic_to_semantic(ids: np.ndarray, segments_info: Iterable[Mapping[str, Any]],
                         categories: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """``(H, W)`` uint8 semantic target: 0 for thing pixels, ``1..S`` for the stuff categories (in increasing
    category id order), 255 for void and crowd pixels.

    Raises:
        ValueError: more than 254 stuff categories (they would not fit the 8-bit target).
    """
    stuff_ids = sorted(int(c["id"]) for c in categories if not c.get("isthing", 0))
    if len(stuff_ids) > 254:
        raise ValueError(f"{len(stuff_ids)} stuff categories do not fit an 8-bit semantic target (at most 254)")
    isthing = {int(c["id"]): bool(c.get("isthing", 0)) for c in categories}
    stuff_index = {cid: i + 1 for i, cid in enumerate(stuff_ids)}
    segs = list(segments_info)
    lut_keys = np.asarray([int(s["id"]) for s in segs], dtype=np.int64)
    lut_vals = np.asarray([SEM_IGNORE if s.get("iscrowd", 0) else (0 if isthing[int(s["category_id"])]
                                                                   else stuff_index[int(s["category_id"])])
                           for s in segs], dtype=np.uint8)
    out = np.full(ids.shape, SEM_IGNORE, np.uint8)
    if len(segs):
        order = np.argsort(lut_keys)
        pos = np.searchsorted(lut_keys[order], ids)
        pos = np.clip(pos, 0, len(segs) - 1)
        hit = lut_keys[order][pos] == ids
        out[hit] = lut_vals[order][pos][hit]
    return out


def load_panoptic_json(path: os.PathLike | str) -> Dict[str, Any]:
    """Read a COCO panoptic JSON and check its shape.

    Raises:
        FileNotFoundError, ValueError: missing file, invalid JSON, or no ``annotations``/``categories``
        (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"panoptic JSON not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    for key in ("annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path} is not a COCO panoptic file: no '{key}' list")
    for ann in data["annotations"][:1]:
        if "segments_info" not in ann or "file_name" not in ann:
            raise ValueError(f"{path}: annotations need 'file_name' and 'segments_info' (COCO panoptic format)")
    return data


# --------------------------------------------------------------------------------- dataset labels
def _rle_masks(annotations: Sequence[Mapping[str, Any]], height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_util

    from cutler.structures.rle import segmentation_to_rle

    if not annotations:
        return np.zeros((0, height, width), bool)
    rles = [segmentation_to_rle(a["segmentation"], height, width) for a in annotations]
    return np.moveaxis(mask_util.decode(rles), -1, 0).astype(bool)


def make_panoptic_labels(instances_json: os.PathLike | str, stuff_dir: os.PathLike | str, out_dir: os.PathLike | str,
                         num_things: int, num_stuff: int, max_stuff_thing_overlap: float = 1.0,
                         shard_index: int = 0, num_shards: int = 1, progress: bool = True) -> Dict[str, Any]:
    """Panoptic pseudo-labels of a dataset: clustered instances (things) merged with stuff label maps.

    Args:
        instances_json: COCO instances whose ``category_id`` is the thing cluster (1..C) and whose
            annotations carry masks (polygons or RLE).
        stuff_dir: folder of stuff label PNGs ``<image file stem>.png`` (values 0 = none, 1..S), e.g. STEGO's
            ``labels/``; an image without one gets things only.
        out_dir: receives ``panoptic/<stem>.png`` (COCO panoptic ids), ``semantic/<stem>.png`` (Panoptic FPN
            targets), and, once every shard is done, ``panoptic.json`` (COCO panoptic) and ``instances.json``
            (the input instances, each image with its ``sem_seg_file_name``: the universal model's training set).
        num_things, num_stuff: C and S.
        max_stuff_thing_overlap: see :func:`merge_things_and_stuff` (published: 0.7).
        shard_index, num_shards: this process handles ``images[shard_index::num_shards]``.

    Returns:
        ``{"images", "done_before", "segments", "missing_stuff", "complete"}`` for this shard (``complete``:
        the JSON files were written).

    Resumable: an image whose record is in the shard's ``records-*.jsonl`` is skipped.
    """
    from collections import defaultdict

    from tqdm import tqdm

    from cutler.maskcut.writer import read_failures, shard_dir_name

    out_dir, stuff_dir = Path(out_dir), Path(stuff_dir)
    data = json.loads(Path(instances_json).read_text(encoding="utf-8"))
    bad = sorted({a["category_id"] for a in data.get("annotations", []) if not 1 <= int(a["category_id"]) <= num_things})
    if bad:
        raise ValueError(f"{instances_json}: category ids {bad[:5]} lie outside the thing clusters 1..{num_things}")
    anns = defaultdict(list)
    for a in data.get("annotations", []):
        anns[a["image_id"]].append(a)
    categories = panoptic_categories(num_things, num_stuff)
    images = sorted(data["images"], key=lambda im: im["id"])
    mine = images[shard_index::num_shards]
    records_path = out_dir / f"records-{shard_dir_name(shard_index, num_shards)}.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {int(r["image_id"]) for r in read_failures(records_path)}  # jsonl reader tolerant of a torn last line
    counts = {"images": len(mine), "done_before": len(done), "segments": 0, "missing_stuff": 0}
    with open(records_path, "a", encoding="utf-8") as log:
        for im in tqdm(mine, desc="panoptic labels", disable=not progress):
            if int(im["id"]) in done:
                continue
            h, w = int(im["height"]), int(im["width"])
            stem = os.path.splitext(im["file_name"])[0]
            stuff_png = stuff_dir / f"{stem}.png"
            if stuff_png.is_file():
                stuff = read_label_png(stuff_png)
                if stuff.shape != (h, w):
                    raise ValueError(f"{stuff_png} is {stuff.shape[1]}x{stuff.shape[0]}, image {im['file_name']} "
                                     f"is {w}x{h}")
            else:
                stuff = np.zeros((h, w), np.int64)
                counts["missing_stuff"] += 1
            things = [a for a in anns[im["id"]] if not a.get("iscrowd", 0)]
            ids, segs = merge_things_and_stuff(_rle_masks(things, h, w), [int(a["category_id"]) for a in things],
                                               stuff, num_things, max_stuff_thing_overlap)
            write_panoptic_png(out_dir / "panoptic" / f"{stem}.png", ids)
            atomic_write_bytes(out_dir / "semantic" / f"{stem}.png", encode_png(panoptic_to_semantic(ids, segs, categories)))
            log.write(json.dumps({"image_id": im["id"], "file_name": f"{stem}.png", "segments_info": segs}) + "\n")
            log.flush()
            counts["segments"] += len(segs)
    counts["complete"] = _finish_panoptic_labels(out_dir, data, images, categories)
    return counts


def _finish_panoptic_labels(out_dir: Path, data: Mapping[str, Any], images: Sequence[Mapping[str, Any]],
                            categories: List[Dict[str, Any]]) -> bool:
    """Write ``panoptic.json`` and ``instances.json`` once every image has a record (any shard); False before."""
    from cutler.maskcut.writer import read_failures
    from cutler.utils.io import atomic_write_json

    records = {}
    for path in sorted(out_dir.glob("records-*.jsonl")):
        for r in read_failures(path):
            records.setdefault(int(r["image_id"]), r)
    if any(int(im["id"]) not in records for im in images):
        return False
    atomic_write_json(out_dir / "panoptic.json", {
        "info": {"description": "U2Seg panoptic pseudo-labels (cutler)"}, "images": list(images),
        "annotations": [records[int(im["id"])] for im in images], "categories": categories})
    with_sem = [dict(im, sem_seg_file_name=f"semantic/{os.path.splitext(im['file_name'])[0]}.png") for im in images]
    atomic_write_json(out_dir / "instances.json", {**{k: v for k, v in data.items() if k != "images"},
                                                   "images": with_sem})
    return True


__all__ = ["SEM_IGNORE", "VOID", "encode_png", "id_to_rgb", "load_panoptic_json", "make_panoptic_labels", "merge_things_and_stuff",
           "panoptic_categories", "panoptic_to_semantic", "read_label_png", "read_panoptic_png", "rgb_to_id",
           "segments_from_ids", "write_panoptic_png"]
