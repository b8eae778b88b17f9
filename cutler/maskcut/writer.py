"""MaskCut outputs: per-shard result chunks written atomically, resume, failures, and the streaming merge.

Layout under ``out_dir``::

    shards/shard-00003-of-00008/chunk-000012.json   # {"images": [...], "annotations": [...]}
    shards/shard-00003-of-00008/failures.jsonl      # one {"id", "file_name", "reason"} per line
    shards/shard-00003-of-00008/summary.json

A chunk is renamed into place only once complete, so an interrupted run leaves whole chunks; a rerun
skips every image found in a chunk or in the failures file. Annotation ids inside chunks are local;
:func:`merge_outputs` numbers them globally and streams, holding one chunk at a time.
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import IO, Iterable, Iterator, List, Optional, Set

from ..utils.io import atomic_open, atomic_write_json
from ..utils.logging import get_logger

logger = get_logger(__name__)

CATEGORIES = [{"id": 1, "name": "fg", "supercategory": "fg"}]
#: Annotation fields holding the id of another annotation of the same image; renumbered with the ids.
REFERENCE_FIELDS = ("parent",)


def _renumber(ann: dict, new_id: int, id_map: dict, where: str) -> None:
    """Give ``ann`` the id ``new_id`` (recording its old one in ``id_map``) and renumber its references,
    which must name annotations seen before it."""
    if "id" in ann:
        id_map[ann["id"]] = new_id
    ann["id"] = new_id
    for key in REFERENCE_FIELDS:
        ref = ann.get(key)
        if ref is not None:
            if ref not in id_map:
                raise ValueError(f"{where}: annotation '{key}' {ref} does not name an earlier annotation of the "
                                 "same image")
            ann[key] = id_map[ref]


# "published": annotations also carry the published script's fields that a downstream tool may read
OUTPUT_FORMATS = ("default", "published")


def published_annotation(ann: dict, width: int, height: int) -> dict:
    """An annotation in the published script's format: integer ``area`` (a pixel count) and the mask's
    ``width``/``height`` (the image's, in the correct order)."""
    return dict(ann, area=int(round(ann["area"])), width=int(width), height=int(height))


def shard_dir_name(shard_index: int, num_shards: int, job_index: Optional[int] = None) -> str:
    """``shard-00003-of-00008`` (prefixed ``job-0002-`` for the published folder-per-job split)."""
    name = f"shard-{shard_index:05d}-of-{num_shards:05d}"
    return f"job-{job_index:04d}-{name}" if job_index is not None else name


def chunk_files(shard_dir: os.PathLike | str) -> List[str]:
    """The complete chunk files of one shard directory, in write order."""
    return sorted(glob.glob(os.path.join(str(shard_dir), "chunk-*.json")))


def read_failures(path: os.PathLike | str) -> Iterator[dict]:
    """Records of a failures.jsonl; a torn last line (crash mid-write) is ignored."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def append_failure(f: IO[str], image_id: int, file_name: str, reason: str) -> None:
    """Append one record to an open failures.jsonl and fsync it at once, so a rerun skips the image even
    after a crash (:func:`read_failures` reads them back)."""
    f.write(json.dumps({"id": int(image_id), "file_name": file_name, "reason": reason}) + "\n")
    f.flush()
    os.fsync(f.fileno())


class ShardWriter:
    """Accumulates results of one shard and writes them in atomic chunks of ``chunk_size`` images.

    Args:
        shard_dir: this shard's output folder (created).
        chunk_size: images per chunk; memory holds at most one chunk of annotations.
    """

    def __init__(self, shard_dir: os.PathLike | str, chunk_size: int = 256):
        self.dir = Path(shard_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.chunk_size = max(1, int(chunk_size))
        self.failures_path = self.dir / "failures.jsonl"
        self.finished: Set[str] = set()
        existing = chunk_files(self.dir)
        for path in existing:
            with open(path, encoding="utf-8") as f:
                self.finished.update(im["file_name"] for im in json.load(f)["images"])
        self.finished_ok = len(self.finished)
        self.failed_before = 0
        for rec in read_failures(self.failures_path):
            if rec["file_name"] not in self.finished:
                self.finished.add(rec["file_name"])
                self.failed_before += 1
        self.next_chunk = 1 + max((int(Path(p).stem.split("-")[1]) for p in existing), default=-1)
        self._images: List[dict] = []
        self._annotations: List[dict] = []
        self._failures = open(self.failures_path, "a", encoding="utf-8")
        self.num_images = self.num_annotations = self.num_failed = 0

    def is_done(self, file_name: str) -> bool:
        """True if ``file_name`` was finished (written or recorded as failed) by this or an earlier run."""
        return file_name in self.finished

    def add(self, image_id: int, file_name: str, width: int, height: int, annotations: Iterable[dict]) -> None:
        """Queue one image record and its annotations (``image_id`` is set here; ids are chunk-local).

        Annotations may carry ids of their own (unique within the image) that :data:`REFERENCE_FIELDS` of later
        annotations refer to (a hierarchy's ``parent``); both are renumbered consistently.
        """
        self._images.append({"id": int(image_id), "file_name": file_name, "width": int(width), "height": int(height)})
        id_map: dict = {}
        for ann in annotations:
            ann = dict(ann)
            _renumber(ann, len(self._annotations) + 1, id_map, f"image {file_name}")
            ann["image_id"] = int(image_id)
            self._annotations.append(ann)
            self.num_annotations += 1
        self.finished.add(file_name)
        self.num_images += 1
        if len(self._images) >= self.chunk_size:
            self.flush()

    def add_failure(self, image_id: int, file_name: str, reason: str) -> None:
        """Record an image that could not be processed (written and fsynced at once)."""
        append_failure(self._failures, image_id, file_name, reason)
        self.finished.add(file_name)
        self.num_failed += 1

    def flush(self) -> None:
        """Write the queued images as the next chunk (atomically)."""
        if not self._images:
            return
        path = self.dir / f"chunk-{self.next_chunk:06d}.json"
        atomic_write_json(path, {"images": self._images, "annotations": self._annotations})
        self.next_chunk += 1
        self._images, self._annotations = [], []

    def close(self, summary: Optional[dict] = None) -> None:
        """Flush and write ``summary.json`` (if given)."""
        self.flush()
        self._failures.close()
        if summary is not None:
            atomic_write_json(self.dir / "summary.json", summary, indent=2)


def _shard_dirs(out_dir: os.PathLike | str) -> List[str]:
    return sorted(d for d in glob.glob(os.path.join(str(out_dir), "shards", "*")) if os.path.isdir(d))


def merge_outputs(out_dir: os.PathLike | str, output_json: os.PathLike | str, info: Optional[dict] = None,
                  output_format: str = "default") -> dict:
    """Merge every shard's chunks under ``out_dir/shards`` into one COCO JSON, streaming.

    Images keep their (global, stable) ids; an image present twice (e.g. two overlapping runs)
    is kept once, from the first chunk in sorted order, with that chunk's annotations only.
    Annotations are renumbered 1..n. Failures of all shards are concatenated into
    ``out_dir/failures.jsonl``. Memory: one chunk plus a map of image ids.
    ``output_format="published"`` writes annotations with :func:`published_annotation`.

    Returns:
        counts ``{"images", "annotations", "failures", "duplicates", "chunks"}``.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"unknown maskcut.output_format '{output_format}', expected one of {OUTPUT_FORMATS}")
    chunks = [c for d in _shard_dirs(out_dir) for c in chunk_files(d)]
    owner = {}  # image id -> chunk index that keeps it
    duplicates = 0
    counts = {"images": 0, "annotations": 0, "failures": 0, "duplicates": 0, "chunks": len(chunks)}
    with atomic_open(output_json, "w", encoding="utf-8") as f:
        f.write('{"info": ' + json.dumps(info or {"description": "MaskCut pseudo-masks (cutler)"}))
        f.write(', "licenses": [], "categories": ' + json.dumps(CATEGORIES) + ', "images": [')
        first = True
        for ci, path in enumerate(chunks):
            with open(path, encoding="utf-8") as cf:
                images = json.load(cf)["images"]
            for im in images:
                if im["id"] in owner:
                    duplicates += 1
                    continue
                owner[im["id"]] = ci
                f.write(("" if first else ", ") + json.dumps(im))
                first = False
                counts["images"] += 1
        f.write('], "annotations": [')
        first = True
        next_id = 1
        for ci, path in enumerate(chunks):
            with open(path, encoding="utf-8") as cf:
                chunk = json.load(cf)
            sizes = {im["id"]: (im["width"], im["height"]) for im in chunk["images"]}
            id_map: dict = {}
            for ann in chunk["annotations"]:
                if owner.get(ann["image_id"]) != ci:
                    continue
                if output_format == "published":
                    ann = published_annotation(ann, *sizes[ann["image_id"]])
                _renumber(ann, next_id, id_map, path)
                next_id += 1
                f.write(("" if first else ", ") + json.dumps(ann))
                first = False
        counts["annotations"] = next_id - 1
        f.write("]}")
    counts["duplicates"] = duplicates
    seen = set()
    with atomic_open(Path(out_dir) / "failures.jsonl", "w", encoding="utf-8") as ff:
        for d in _shard_dirs(out_dir):
            for rec in read_failures(os.path.join(d, "failures.jsonl")):
                if rec["file_name"] in seen or rec.get("id") in owner:
                    continue
                seen.add(rec["file_name"])
                ff.write(json.dumps(rec) + "\n")
                counts["failures"] += 1
    logger.info("merged %d chunks: %d images, %d annotations, %d failures -> %s", counts["chunks"],
                counts["images"], counts["annotations"], counts["failures"], output_json)
    return counts
