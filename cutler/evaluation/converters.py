"""Converters from the benchmarks' native annotation formats to class-agnostic COCO JSON (or, with
``keep_classes``, COCO JSON keeping the source's categories, for class-aware evaluation such as U2Seg's).

Every converter returns a COCO dict with one category (``{"id": 1, "name": "object"}``), image
entries with ``file_name`` relative to the dataset's image folder plus ``height``/``width``, and
annotations with ``bbox`` (XYWH, pixels), ``area``, ``iscrowd`` and, where the source has them,
``segmentation``. Regions the source marks as "ignore" (KITTI ``DontCare``, OpenImages group boxes,
optionally VOC ``difficult``) become ``iscrowd=1``: COCO evaluation counts detections on them neither
as hits nor as false positives. The thin command lines live in ``datasets/convert_*.py``; the
layout they expect is in ``datasets/README.md``.
"""
from __future__ import annotations

import csv
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..utils.image import ImageReadError, image_size
from ..utils.io import atomic_open
from ..utils.logging import get_logger
from .coco_eval import AGNOSTIC_CATEGORY, AGNOSTIC_CATEGORY_ID, normalize_gt

logger = get_logger(__name__)


class _Builder:
    """Accumulates images and annotations with consecutive ids (1-based)."""

    def __init__(self) -> None:
        self.images: List[Dict[str, Any]] = []
        self.annotations: List[Dict[str, Any]] = []
        self.skipped_boxes = 0

    def add_image(self, file_name: str, height: int, width: int, **extra: Any) -> int:
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "height": int(height), "width": int(width), **extra})
        return image_id

    def add_box(self, image_id: int, x0: float, y0: float, x1: float, y1: float, iscrowd: int = 0,
                **extra: Any) -> None:
        """Add an XYXY box (pixels), clipped to the image; empty boxes are counted and skipped."""
        img = self.images[image_id - 1]
        x0, x1 = max(0.0, min(x0, img["width"])), max(0.0, min(x1, img["width"]))
        y0, y1 = max(0.0, min(y0, img["height"])), max(0.0, min(y1, img["height"]))
        w, h = x1 - x0, y1 - y0
        if w <= 0 or h <= 0:
            self.skipped_boxes += 1
            return
        self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id,
                                 "category_id": AGNOSTIC_CATEGORY_ID, "bbox": [x0, y0, w, h], "area": w * h,
                                 "iscrowd": int(iscrowd), **extra})

    def result(self, description: str, categories: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
        if self.skipped_boxes:
            logger.warning("%s: skipped %d empty or out-of-image boxes", description, self.skipped_boxes)
        return {"info": {"description": description}, "images": self.images, "annotations": self.annotations,
                "categories": categories or [dict(AGNOSTIC_CATEGORY)]}


def write_coco_json(dataset: Mapping[str, Any], path: os.PathLike | str) -> Path:
    """Write a COCO dict atomically (compact JSON); returns the path."""
    path = Path(path)
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(dataset, f, separators=(",", ":"))
    logger.info("wrote %s: %d images, %d annotations", path, len(dataset["images"]), len(dataset["annotations"]))
    return path


# ------------------------------------------------------------------------------ VOC (and VOC-style)
def _xml_text(node: ET.Element, tag: str, default: Optional[str] = None) -> Optional[str]:
    child = node.find(tag)
    return child.text.strip() if child is not None and child.text is not None else default


VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def convert_voc(root: os.PathLike | str, splits: Sequence[str] = ("trainval",), difficult: str = "keep",
                image_dir: str = "JPEGImages", image_ext: str = ".jpg", keep_classes: bool = False) -> Dict[str, Any]:
    """Pascal VOC-style XML annotations -> class-agnostic COCO (or, with ``keep_classes``, the 20 VOC classes
    as categories 1..20 in VOC order, any other object name after them in sorted order).

    Also serves Clipart, Watercolor and Comic (cross-domain-detection), which use the same layout.

    Args:
        root: a ``VOCdevkit/VOC2007``-like folder with ``Annotations/``, ``ImageSets/Main/<split>.txt``
            and ``JPEGImages/``.
        splits: image-set files to take, in order, de-duplicated (e.g. ``("trainval", "test")``).
        difficult: ``"keep"`` (ordinary objects), ``"ignore"`` (``iscrowd=1``: the VOC metric's
            treatment) or ``"drop"``.
        image_dir: image folder name (used only when an XML lacks a size and for the file suffix check).
        image_ext: suffix of image files when the XML has no ``<filename>``.

    Boxes: VOC corners are 1-based inclusive pixels, so ``x = xmin - 1`` and ``w = xmax - xmin + 1``.
    """
    if difficult not in ("keep", "ignore", "drop"):
        raise ValueError(f"difficult must be keep|ignore|drop, got {difficult!r}")
    root = Path(root)
    ids: List[str] = []
    seen = set()
    for split in splits:
        list_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(f"VOC image set not found: {list_file}")
        for line in list_file.read_text().split("\n"):
            stem = line.strip().split(" ")[0]
            if stem and stem not in seen:
                seen.add(stem)
                ids.append(stem)
    b = _Builder()
    names: Dict[str, int] = {n: i + 1 for i, n in enumerate(VOC_CLASSES)}
    found: List[Tuple[int, str]] = []  # (annotation index, class name)
    for stem in ids:
        xml_path = root / "Annotations" / f"{stem}.xml"
        tree = ET.parse(xml_path).getroot()
        file_name = _xml_text(tree, "filename") or f"{stem}{image_ext}"
        size = tree.find("size")
        w = int(float(_xml_text(size, "width", "0"))) if size is not None else 0
        h = int(float(_xml_text(size, "height", "0"))) if size is not None else 0
        if w <= 0 or h <= 0:  # a few VOC-style sets leave <size> at 0: read the image header instead
            w, h = image_size(root / image_dir / file_name)
        image_id = b.add_image(file_name, h, w)
        for obj in tree.findall("object"):
            is_difficult = _xml_text(obj, "difficult", "0") == "1"
            if is_difficult and difficult == "drop":
                continue
            bb = obj.find("bndbox")
            xmin, ymin, xmax, ymax = (float(_xml_text(bb, k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            before = len(b.annotations)
            b.add_box(image_id, xmin - 1.0, ymin - 1.0, xmax, ymax,
                      iscrowd=int(is_difficult and difficult == "ignore"))
            if keep_classes and len(b.annotations) > before:
                found.append((before, (_xml_text(obj, "name") or "").strip().lower()))
    if not keep_classes:
        return b.result(f"class-agnostic {root.name} {'+'.join(splits)} (VOC XML)")
    for extra in sorted({n for _, n in found} - set(names)):
        names[extra] = len(names) + 1
    for k, name in found:
        b.annotations[k]["category_id"] = names[name]
    categories = [{"id": i, "name": n, "supercategory": "object"} for n, i in names.items()]
    return b.result(f"{root.name} {'+'.join(splits)} (VOC XML, classes kept)", categories)


# ------------------------------------------------------------------------------------------- KITTI
KITTI_IGNORE_TYPES = ("DontCare",)


def convert_kitti(label_dir: os.PathLike | str, image_dir: os.PathLike | str, image_ext: str = ".png",
                  dontcare: str = "ignore") -> Dict[str, Any]:
    """KITTI object label files (``label_2/*.txt``) -> class-agnostic COCO.

    Each line is ``type truncated occluded alpha x1 y1 x2 y2 h w l x y z ry`` with a 0-based pixel box
    ``[x1, y1, x2, y2]``. Every type is an object except ``DontCare`` (``"ignore"``: ``iscrowd=1``,
    ``"drop"``, or ``"keep"``). Image sizes come from the image headers (KITTI sizes vary slightly).
    Labels without an image are skipped with a warning.
    """
    if dontcare not in ("keep", "ignore", "drop"):
        raise ValueError(f"dontcare must be keep|ignore|drop, got {dontcare!r}")
    label_dir, image_dir = Path(label_dir), Path(image_dir)
    b = _Builder()
    missing = 0
    for label in sorted(label_dir.glob("*.txt")):
        file_name = label.stem + image_ext
        try:
            w, h = image_size(image_dir / file_name)
        except ImageReadError:
            missing += 1
            continue
        image_id = b.add_image(file_name, h, w)
        for line in label.read_text().splitlines():
            parts = line.split()
            if len(parts) < 8:
                continue
            is_ignore = parts[0] in KITTI_IGNORE_TYPES
            if is_ignore and dontcare == "drop":
                continue
            x0, y0, x1, y1 = (float(v) for v in parts[4:8])
            b.add_box(image_id, x0, y0, x1, y1, iscrowd=int(is_ignore and dontcare == "ignore"))
    if missing:
        logger.warning("KITTI: %d label files have no readable image in %s (skipped)", missing, image_dir)
    return b.result("class-agnostic KITTI (label_2)")


# -------------------------------------------------------------------------------------- OpenImages
def convert_openimages(csv_path: os.PathLike | str, image_dir: os.PathLike | str, image_ext: str = ".jpg",
                       group_of: str = "ignore", sizes: Optional[Mapping[str, Tuple[int, int]]] = None
                       ) -> Dict[str, Any]:
    """OpenImages box CSV (``validation-annotations-bbox.csv``) -> class-agnostic COCO.

    Coordinates ``XMin, XMax, YMin, YMax`` are fractions of the image size; they become pixels with the
    image's ``(width, height)`` from ``sizes`` (``{ImageID: (w, h)}``) or from the image header.
    ``IsGroupOf=1`` boxes (one box around several instances) are ``"ignore"`` (``iscrowd=1``, default),
    ``"keep"`` or ``"drop"``. Only images present in ``image_dir`` (or in ``sizes``) are kept.
    """
    if group_of not in ("keep", "ignore", "drop"):
        raise ValueError(f"group_of must be keep|ignore|drop, got {group_of!r}")
    image_dir = Path(image_dir)
    b = _Builder()
    image_ids: Dict[str, Optional[int]] = {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"ImageID", "XMin", "XMax", "YMin", "YMax"}
        if not need <= set(reader.fieldnames or ()):
            raise ValueError(f"{csv_path}: expected columns {sorted(need)}, got {reader.fieldnames}")
        for row in reader:
            key = row["ImageID"]
            if key not in image_ids:
                file_name = key + image_ext
                try:
                    w, h = sizes[key] if sizes is not None and key in sizes else image_size(image_dir / file_name)
                    image_ids[key] = b.add_image(file_name, h, w)
                except ImageReadError:
                    image_ids[key] = None
            image_id = image_ids[key]
            if image_id is None:
                continue
            is_group = row.get("IsGroupOf", "0") == "1"
            if is_group and group_of == "drop":
                continue
            img = b.images[image_id - 1]
            W, H = img["width"], img["height"]
            b.add_box(image_id, float(row["XMin"]) * W, float(row["YMin"]) * H, float(row["XMax"]) * W,
                      float(row["YMax"]) * H, iscrowd=int(is_group and group_of == "ignore"))
    missing = sum(v is None for v in image_ids.values())
    if missing:
        logger.warning("OpenImages: %d images of the CSV are missing or unreadable in %s (skipped)", missing, image_dir)
    return b.result("class-agnostic OpenImages (bbox CSV)")


# ---------------------------------------------------------------- COCO-style (Objects365, LVIS, UVO)
def _file_name(img: Mapping[str, Any], mode: str) -> str:
    if mode == "keep":
        return img["file_name"]
    if mode == "basename":
        return os.path.basename(img["file_name"])
    if mode == "coco_url":
        # LVIS v1 images are COCO 2017 images named by URL: .../val2017/000000397133.jpg -> val2017/000000397133.jpg
        url = img.get("coco_url") or img.get("file_name")
        return "/".join(url.rstrip("/").split("/")[-2:])
    raise ValueError(f"file_name mode must be keep|basename|coco_url, got {mode!r}")


def convert_coco_style(source: os.PathLike | str | Mapping[str, Any], file_names: str = "keep",
                       image_list: Optional[Iterable[str]] = None, drop_empty_images: bool = False,
                       keep_classes: bool = False, drop_categories: Sequence[str] = ()) -> Dict[str, Any]:
    """A COCO-format JSON with many categories (Objects365 v2, LVIS v1, UVO, COCO) -> class-agnostic.

    Masks, ``iscrowd`` and ``ignore`` flags are kept (``ignore`` becomes ``iscrowd``, see
    :func:`~cutler.evaluation.coco_eval.to_class_agnostic`); boxes with no area are dropped.
    With ``keep_classes`` the categories are kept, less those named in ``drop_categories`` (case-insensitive;
    e.g. UVO's "other", which U2Seg's evaluation removes) and their annotations.

    Args:
        source: path or dict.
        file_names: ``"keep"``, ``"basename"`` (flattened image folder) or ``"coco_url"`` (LVIS:
            ``val2017/<name>.jpg`` taken from the image URL, relative to the ``coco/`` folder).
        image_list: keep only these images, matched by base file name (e.g. the 19,817 COCO20K names).
        drop_empty_images: drop images without annotations (the benchmarks keep them: default False).
    """
    data = normalize_gt(source, class_agnostic=not keep_classes)
    if keep_classes and drop_categories:
        dropped_names = {n.lower() for n in drop_categories}
        gone = {c["id"] for c in data["categories"] if str(c.get("name", "")).lower() in dropped_names}
        data["categories"] = [c for c in data["categories"] if c["id"] not in gone]
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] not in gone]
    images = data["images"]
    if image_list is not None:
        wanted = {os.path.basename(n.strip()) for n in image_list if n.strip()}
        images = [img for img in images if os.path.basename(img["file_name"]) in wanted]
        if len(images) < len(wanted):
            logger.warning("image list: %d of %d names not found in the source", len(wanted) - len(images), len(wanted))
    keep_ids = {img["id"] for img in images}
    anns = []
    dropped = 0
    for a in data["annotations"]:
        if a["image_id"] not in keep_ids:
            continue
        x, y, w, h = a["bbox"]
        if w <= 0 or h <= 0:
            dropped += 1
            continue
        anns.append(a)
    if dropped:
        logger.warning("dropped %d annotations with empty boxes", dropped)
    if drop_empty_images:
        with_anns = {a["image_id"] for a in anns}
        images = [img for img in images if img["id"] in with_anns]
    images = [{**img, "file_name": _file_name(img, file_names)} for img in images]
    # original ids are kept: results and other tools may refer to them
    description = "COCO-style JSON, classes kept" if keep_classes else "class-agnostic conversion of a COCO-style JSON"
    return {"info": {"description": description}, "images": images, "annotations": anns,
            "categories": data["categories"]}
