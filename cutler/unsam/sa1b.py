"""SA-1B (Segment Anything 1-Billion) per-image annotations -> one class-agnostic COCO JSON.

SA-1B ships one JSON per image beside it (``sa_223750.jpg`` + ``sa_223750.json``)::

    {"image": {"image_id": 223750, "width": 1500, "height": 2250, "file_name": "sa_223750.jpg"},
     "annotations": [{"id": ..., "segmentation": {"size": [2250, 1500], "counts": "<COCO RLE string>"},
                      "bbox": [x, y, w, h], "area": ..., "predicted_iou": ..., "stability_score": ...,
                      "crop_box": [...], "point_coords": [[x, y]]}, ...]}

The masks are class-agnostic and overlap (wholes and parts), exactly what UnSAM's AR measures. The converter
keeps the RLE masks as they are (checking their size against the image), computes missing boxes and areas from
them, renumbers annotations, and can take a random subset of images (the paper evaluates 1000 images that were
not used for training) or an explicit list.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from ..evaluation.coco_eval import AGNOSTIC_CATEGORY
from ..structures.rle import rle_area, rle_to_bbox, rle_to_json, segmentation_to_rle
from ..utils.logging import get_logger

logger = get_logger(__name__)


class SA1BFormatError(ValueError):
    """A per-image SA-1B JSON that does not have the expected fields (the message names the file)."""


def _read(path: Path) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise SA1BFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("image"), dict) or \
            not isinstance(data.get("annotations"), list):
        raise SA1BFormatError(f"{path}: expected an SA-1B image JSON with 'image' and 'annotations'")
    missing = [k for k in ("image_id", "width", "height") if k not in data["image"]]
    if missing:
        raise SA1BFormatError(f"{path}: 'image' lacks {missing}")
    return data


def list_sa1b_files(folder: os.PathLike | str) -> List[Path]:
    """The per-image JSON files of an SA-1B folder (``sa_*.json``, recursively), sorted."""
    files = sorted(Path(folder).rglob("sa_*.json"))
    if not files:
        raise FileNotFoundError(f"no SA-1B per-image JSON (sa_*.json) under {folder}")
    return files


def convert_sa1b(files: Iterable[os.PathLike | str], image_root: Optional[os.PathLike | str] = None,
                 num_images: int = 0, seed: int = 0, exclude: Sequence[str] = ()) -> Dict[str, Any]:
    """SA-1B per-image JSONs -> one class-agnostic COCO dict.

    Args:
        files: per-image JSON paths.
        image_root: the folder ``file_name`` is made relative to (default: each JSON's folder, i.e. file names
            are kept as SA-1B gives them).
        num_images: keep a random subset of this many images (0 = all), drawn with ``seed`` after ``exclude``.
        seed: subset seed.
        exclude: image file names (base names) not to take, e.g. the images the pseudo-masks were trained on.

    Returns:
        COCO dict with one category, ``images`` (``id`` = SA-1B ``image_id``) and ``annotations`` (RLE masks,
        ``bbox``, ``area``, ``iscrowd`` 0, ids 1..N).

    Raises:
        SA1BFormatError: a malformed file, a mask whose size differs from its image, duplicate image ids.
    """
    paths = [Path(p) for p in files]
    skip = {os.path.basename(n) for n in exclude}
    paths = [p for p in paths if p.with_suffix(".jpg").name not in skip and p.name not in skip]
    if num_images and num_images < len(paths):
        paths = sorted(random.Random(seed).sample(paths, num_images))
    images: List[Dict[str, Any]] = []
    annotations: List[Dict[str, Any]] = []
    seen = {}
    for path in paths:
        data = _read(path)
        img = data["image"]
        image_id = int(img["image_id"])
        if image_id in seen:
            raise SA1BFormatError(f"{path}: image_id {image_id} also in {seen[image_id]}")
        seen[image_id] = path
        h, w = int(img["height"]), int(img["width"])
        name = img.get("file_name") or path.with_suffix(".jpg").name
        full = path.parent / name
        file_name = os.path.relpath(full, image_root) if image_root is not None else name
        images.append({"id": image_id, "file_name": file_name.replace(os.sep, "/"), "height": h, "width": w})
        for k, ann in enumerate(data["annotations"]):
            seg = ann.get("segmentation")
            if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
                raise SA1BFormatError(f"{path}: annotation {k} has no RLE 'segmentation' with 'size' and 'counts'")
            if [int(v) for v in seg["size"]] != [h, w]:
                raise SA1BFormatError(f"{path}: annotation {k} mask size {seg['size']} differs from the image {h}x{w}")
            rle = segmentation_to_rle(seg, h, w)
            area = float(ann["area"]) if "area" in ann else rle_area(rle)
            bbox = [float(v) for v in ann["bbox"]] if "bbox" in ann else rle_to_bbox(rle)
            if area <= 0:
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                "segmentation": rle_to_json(rle),
                                "area": area, "bbox": bbox})
    logger.info("SA-1B: %d images, %d masks", len(images), len(annotations))
    return {"info": {"description": "class-agnostic SA-1B (converted by cutler)"}, "images": images,
            "annotations": annotations, "categories": [dict(AGNOSTIC_CATEGORY)]}
