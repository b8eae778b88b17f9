"""COCO-format datasets as lists of plain records (one place for reading annotation files).

A record is a dict::

    {"file_name": str (absolute path), "height": int, "width": int, "image_id": int,
     "sem_seg_file_name": str (optional; absolute path of a uint8 label PNG: Panoptic FPN's semantic target),
     "annotations": [{"bbox": [x, y, w, h] (pixels, XYWH), "segmentation": polygons | RLE | None,
                      "category_id": int (contiguous, 0-based), "iscrowd": 0 | 1}, ...]}

Every training source of the project (MaskCut output, self-training rounds, COCO and its semi-supervised
splits, the synthetic set) is such a JSON plus an image folder, resolved by name through
:mod:`cutler.data.catalog`.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from cutler.structures.rle import rle_to_bbox, segmentation_to_rle
from cutler.utils.logging import get_logger

from .catalog import get_dataset

logger = get_logger(__name__)


class AnnotationFileError(ValueError):
    """An annotation file that cannot be used; the message names the file and what is wrong."""


def _read_json(json_file: Path) -> dict:
    if not json_file.is_file():
        raise FileNotFoundError(f"annotation file not found: {json_file}")
    if json_file.stat().st_size == 0:
        raise AnnotationFileError(f"annotation file {json_file} is empty")
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationFileError(f"annotation file {json_file} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or "images" not in data:
        raise AnnotationFileError(f"annotation file {json_file} is not COCO format (no 'images' list at the top level)")
    if not isinstance(data["images"], list) or not isinstance(data.get("annotations", []), list):
        raise AnnotationFileError(f"annotation file {json_file}: 'images' and 'annotations' must be lists")
    return data


def load_coco_json(json_file: os.PathLike | str, image_root: os.PathLike | str, class_agnostic: bool = False,
                   keep_crowd: bool = False) -> List[Dict]:
    """Read a COCO instances JSON (polygon or RLE masks) into records.

    Args:
        json_file: the annotation file.
        image_root: folder that ``images[*].file_name`` are relative to.
        class_agnostic: map every category to 0 (the single "fg" class of unsupervised training);
            otherwise category ids are mapped to 0..K-1 in increasing id order.
        keep_crowd: keep ``iscrowd=1`` annotations (training drops them, like Detectron2).

    Raises:
        FileNotFoundError: missing file. AnnotationFileError: empty, invalid JSON, not COCO, no images,
            or an annotation without a usable box or mask (the message names the file and the annotation).
    """
    json_file, image_root = Path(json_file), Path(image_root)
    data = _read_json(json_file)
    if not data["images"]:
        raise AnnotationFileError(f"annotation file {json_file} lists no images")
    cat_ids = sorted({c["id"] for c in data.get("categories", [])} | {a.get("category_id", 1) for a in data.get("annotations", [])})
    id_map = {cid: (0 if class_agnostic else i) for i, cid in enumerate(cat_ids)}

    records: Dict[int, Dict] = {}
    for img in data["images"]:
        try:
            rec = {"file_name": str(image_root / img["file_name"]), "height": int(img["height"]),
                   "width": int(img["width"]), "image_id": img["id"], "annotations": []}
            if img.get("sem_seg_file_name"):  # panoptic training: the image's semantic target, beside the JSON
                rec["sem_seg_file_name"] = str(json_file.parent / img["sem_seg_file_name"])
        except (KeyError, TypeError, ValueError) as e:
            raise AnnotationFileError(f"annotation file {json_file}: image entry {img!r:.200} lacks {e}") from None
        records[img["id"]] = rec

    dropped_degenerate = 0
    for ann in data.get("annotations", []):
        rec = records.get(ann.get("image_id"))
        if rec is None:
            raise AnnotationFileError(
                f"annotation file {json_file}: annotation {ann.get('id')} refers to unknown image_id {ann.get('image_id')}")
        if ann.get("iscrowd", 0) and not keep_crowd:
            continue
        seg = ann.get("segmentation")
        if isinstance(seg, list):
            seg = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]  # a polygon needs >= 3 points
            if not seg:
                seg = None
        bbox = ann.get("bbox")
        if bbox is None:
            if seg is None:
                raise AnnotationFileError(f"annotation file {json_file}: annotation {ann.get('id')} has neither bbox nor segmentation")
            bbox = _bbox_from_segmentation(seg, rec["height"], rec["width"])
        if len(bbox) != 4:
            raise AnnotationFileError(f"annotation file {json_file}: annotation {ann.get('id')} has bbox {bbox!r}")
        if bbox[2] <= 0 or bbox[3] <= 0:
            dropped_degenerate += 1
            continue
        rec["annotations"].append({
            "bbox": [float(v) for v in bbox], "segmentation": seg,
            "category_id": id_map[ann.get("category_id", cat_ids[0] if cat_ids else 1)],
            "iscrowd": int(ann.get("iscrowd", 0)),
        })
    if dropped_degenerate:
        logger.warning("%s: dropped %d annotations with empty boxes", json_file, dropped_degenerate)
    return list(records.values())


def _bbox_from_segmentation(seg, height: int, width: int) -> List[float]:
    return rle_to_bbox(segmentation_to_rle(seg, height, width))


def get_detection_dataset_dicts(names: Sequence[str] | str, root: Optional[os.PathLike | str] = None,
                                filter_empty: bool = True, class_agnostic: bool = True) -> List[Dict]:
    """Records of one or more registered datasets, concatenated.

    Args:
        names: catalog names (see :mod:`cutler.data.catalog`).
        root: the datasets root (``cfg.datasets.root``).
        filter_empty: drop images that have no (non-crowd) annotation.
        class_agnostic: see :func:`load_coco_json`.

    Raises:
        AnnotationFileError: no image left (names the datasets), or any error of :func:`load_coco_json`.
    """
    if isinstance(names, str):
        names = [names]
    out: List[Dict] = []
    for name in names:
        ds = get_dataset(name, root)
        recs = load_coco_json(ds.json_file, ds.image_root, class_agnostic=class_agnostic)
        n_empty = sum(not r["annotations"] for r in recs)
        if filter_empty:
            recs = [r for r in recs if r["annotations"]]
        logger.info("dataset %s: %d images (%d without annotations, %s), %d instances", name, len(recs), n_empty,
                    "removed" if filter_empty else "kept", sum(len(r["annotations"]) for r in recs))
        out.extend(recs)
    if not out:
        raise AnnotationFileError(f"no training images left in {list(names)} (filter_empty_annotations={filter_empty})")
    return out


class SerializedList:
    """A list of records pickled into one numpy byte buffer.

    Worker processes forked from the trainer read it without touching Python reference counts, so the
    pages stay shared (a plain list of 1M dicts would be copied into every worker, as Detectron2 notes).
    """

    def __init__(self, items: Sequence):
        blobs = [np.frombuffer(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8) for x in items]
        self._addr = np.cumsum(np.asarray([len(b) for b in blobs], dtype=np.int64))
        self._buf = np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._addr)

    def __getitem__(self, i: int):
        start = 0 if i == 0 else int(self._addr[i - 1])
        return pickle.loads(memoryview(self._buf[start:int(self._addr[i])]))
