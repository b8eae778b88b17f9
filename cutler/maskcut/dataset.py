"""MaskCut inputs: listing a dataset, job/shard selection, decoding and resizing images in workers."""
from __future__ import annotations

import abc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..utils.image import ImageReadError, list_images, read_image_rgb


@dataclass(frozen=True)
class ImageRecord:
    """One input image: a stable id, its name relative to the dataset root, and its path on disk."""

    id: int
    file_name: str
    path: str


def list_dataset(dataset_path: str, image_root: Optional[str] = None) -> Tuple[List[ImageRecord], str]:
    """All images of a dataset, in a stable global order.

    Args:
        dataset_path: a folder (any tree: ImageNet class folders or flat), or a COCO JSON whose
            ``images`` list names the files (then ``image_root`` is the folder they are relative to;
            default: the JSON's folder).
        image_root: see above.

    Returns:
        (records, root). For a folder, ids are ``1 + index`` in the sorted relative-path list, so
        every shard and every rerun agrees on them; for a COCO JSON the JSON's ids are kept.
    """
    p = Path(dataset_path)
    if p.is_dir():
        root = str(p)
        names = list_images(root)
        return [ImageRecord(i + 1, n, os.path.join(root, n)) for i, n in enumerate(names)], root
    if p.is_file() and p.suffix.lower() == ".json":
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
        root = image_root or str(p.parent)
        images = sorted(data.get("images", []), key=lambda im: int(im["id"]))
        return [ImageRecord(int(im["id"]), im["file_name"], os.path.join(root, im["file_name"])) for im in images], root
    raise FileNotFoundError(f"dataset path {dataset_path} is neither a folder nor a COCO .json file")


def select_job_folders(records: Sequence[ImageRecord], num_folder_per_job: int, job_index: int) -> List[ImageRecord]:
    """The published ImageNet job split: top-level folders ``[job_index * n, (job_index + 1) * n)`` in
    sorted order (``n = num_folder_per_job``; 0 = all). Images directly in the root count as folder ''."""
    if num_folder_per_job <= 0:
        return list(records)
    folders = sorted({r.file_name.replace("\\", "/").split("/")[0] if "/" in r.file_name.replace("\\", "/") else ""
                      for r in records})
    chosen = set(folders[job_index * num_folder_per_job:(job_index + 1) * num_folder_per_job])
    if not chosen:
        raise ValueError(f"job index {job_index} selects no folder ({len(folders)} folders, "
                         f"{num_folder_per_job} per job)")
    return [r for r in records
            if (r.file_name.replace("\\", "/").split("/")[0] if "/" in r.file_name.replace("\\", "/") else "") in chosen]


def resolve_shard(shard_index: int = -1, num_shards: int = -1) -> Tuple[int, int]:
    """``(index, count)``: explicit values win; -1 takes torchrun's ``RANK``/``WORLD_SIZE`` (else 0/1)."""
    count = num_shards if num_shards > 0 else int(os.environ.get("WORLD_SIZE", 1))
    index = shard_index if shard_index >= 0 else int(os.environ.get("RANK", 0))
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside [0, {count})")
    return index, count


def shard_records(records: Sequence[ImageRecord], shard_index: int, num_shards: int) -> List[ImageRecord]:
    """Every ``num_shards``-th record starting at ``shard_index`` (strided: balances class folders)."""
    return [r for i, r in enumerate(records) if i % num_shards == shard_index]


def resize_for_maskcut(image: np.ndarray, fixed_size: int, patch_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """``(H, W, 3)`` uint8 -> (``fixed``, ``resized``): Lanczos to a ``fixed_size`` square (the CRF image),
    then Lanczos to the nearest multiple of the patch size (the ViT input; the same array when
    ``fixed_size`` is already a multiple)."""
    img = Image.fromarray(image).resize((fixed_size, fixed_size), Image.LANCZOS)
    side = max(patch_size, int(round(fixed_size / patch_size)) * patch_size)
    fixed = np.array(img)  # writable: pydensecrf refuses read-only buffers
    if side == fixed_size:
        return fixed, fixed
    return fixed, np.array(img.resize((side, side), Image.LANCZOS))


class DecodedImages(torch.utils.data.Dataset, abc.ABC):
    """Decodes images in DataLoader workers and prepares each with :meth:`prepare`; never raises for a bad image.

    Items are dicts: ``record``, ``width``/``height`` (original, EXIF-oriented), the arrays :meth:`prepare`
    returns, ``decode_s``; or ``record`` + ``error`` (the reason) when the image cannot be used.
    """

    min_size = 1  # smallest accepted image side in pixels

    def __init__(self, records: Sequence[ImageRecord]):
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    @abc.abstractmethod
    def prepare(self, rgb: np.ndarray) -> dict:
        """The arrays an item carries, from the decoded ``(H, W, 3)`` uint8 RGB image."""

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        t0 = time.perf_counter()
        try:
            arr = read_image_rgb(rec.path, min_size=self.min_size)
            arrays = self.prepare(arr)
        except ImageReadError as e:
            return {"record": rec, "error": e.reason}
        except (MemoryError, OSError, ValueError) as e:  # anything PIL still raises for odd files
            return {"record": rec, "error": f"{type(e).__name__}: {e}"}
        return {"record": rec, "width": int(arr.shape[1]), "height": int(arr.shape[0]), **arrays,
                "decode_s": time.perf_counter() - t0}


class MaskCutImages(DecodedImages):
    """MaskCut's inputs: ``image`` (the ``fixed_size`` RGB uint8 array the CRF uses) and ``resized`` (the ViT
    input, a patch multiple) per item (see :class:`DecodedImages`)."""

    def __init__(self, records: Sequence[ImageRecord], fixed_size: int, patch_size: int):
        super().__init__(records)
        self.fixed_size = fixed_size
        self.patch_size = patch_size
        self.min_size = patch_size

    def prepare(self, rgb: np.ndarray) -> dict:
        fixed, resized = resize_for_maskcut(rgb, self.fixed_size, self.patch_size)
        return {"image": fixed, "resized": resized}


def collate_items(items: list) -> list:
    """Keep the batch as a list of dicts (failed items have no arrays to stack)."""
    return items
