"""Tiny COCO fixtures shared by the data, copy-paste and trainer tests (no tests here)."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_util


def make_coco_dataset(root, name: str = "tiny", num_images: int = 8, seed: int = 0, sizes=((48, 64), (64, 48)),
                      num_empty: int = 0, rle_every: int = 2) -> dict:
    """Write ``root/name/images/*.png`` + ``root/name/annotations.json``.

    Each image holds 1-3 non-overlapping axis-aligned rectangles of distinct colours on a dark noisy
    background; annotations alternate polygon and RLE (every ``rle_every``-th is RLE). The last
    ``num_empty`` images have no annotation. Returns ``{"image_root", "json_file", "masks": {image_id: (M,H,W)}}``.
    """
    rng = np.random.default_rng(seed)
    root = Path(root) / name
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns, all_masks = [], [], {}
    for i in range(num_images):
        h, w = sizes[i % len(sizes)]
        img = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
        masks = []
        if i < num_images - num_empty:
            # Rectangles in disjoint vertical strips: never overlapping.
            n = int(rng.integers(1, 4))
            strip = w // n
            for k in range(n):
                x0 = k * strip + int(rng.integers(0, 3))
                x1 = x0 + int(rng.integers(4, max(5, strip - 2)))
                y0 = int(rng.integers(0, h // 2))
                y1 = y0 + int(rng.integers(4, h - y0))
                img[y0:y1, x0:x1] = rng.integers(80, 255, 3)
                m = np.zeros((h, w), bool)
                m[y0:y1, x0:x1] = True
                masks.append(m)
                aid = len(anns) + 1
                if aid % rle_every == 0:
                    rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
                    seg = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
                else:
                    seg = [[x0, y0, x1, y0, x1, y1, x0, y1]]
                anns.append({"id": aid, "image_id": i + 1, "category_id": 1, "iscrowd": 0, "area": float(m.sum()),
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": seg})
        all_masks[i + 1] = np.stack(masks) if masks else np.zeros((0, h, w), bool)
        fname = f"img_{i:03d}.png"
        cv2.imwrite(str(root / "images" / fname), img[:, :, ::-1])
        images.append({"id": i + 1, "file_name": fname, "height": h, "width": w})
    json_file = root / "annotations.json"
    json_file.write_text(json.dumps({"images": images, "annotations": anns,
                                     "categories": [{"id": 1, "name": "fg"}]}))
    return {"image_root": root / "images", "json_file": json_file, "masks": all_masks}


def register_tiny(root, name: str, **kwargs) -> dict:
    """:func:`make_coco_dataset` + ``register_dataset(name, ...)`` with absolute paths."""
    from cutler.data.catalog import register_dataset

    info = make_coco_dataset(root, name, **kwargs)
    register_dataset(name, str(info["image_root"]), str(info["json_file"]), overwrite=True)
    return info
