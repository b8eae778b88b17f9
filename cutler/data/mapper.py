"""Record -> model input: decode, resize (shortest edge), flip, annotations -> ``"instances"``.

The output dict is what :func:`cutler.modeling.build.build_model`'s models take::

    {"image": uint8 Tensor[3, H, W] (RGB, resized), "height": int, "width": int (ORIGINAL size),
     "image_id", "file_name",
     "instances": {"boxes": float Tensor[M, 4] XYXY in resized pixels, "classes": int64 Tensor[M],
                   "masks": bool Tensor[M, H, W]}}        # training only; "masks" when the data has masks

Randomness comes from an explicit ``numpy.random.Generator`` per sample, so the same sample at the same
position of the training stream gets the same augmentation whatever the number of workers or ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

from cutler.utils.image import ImageReadError, read_image_rgb

from .coco import segmentation_to_rle


def shortest_edge_size(h: int, w: int, short: int, max_size: int) -> Tuple[int, int]:
    """Output ``(new_h, new_w)`` of Detectron2's ResizeShortestEdge for a ``h x w`` image: shortest edge
    ``short``, longest at most ``max_size`` (``short <= 0`` keeps the size; ``max_size <= 0``: no cap).
    Used for training and testing alike."""
    if short <= 0:
        return h, w
    scale = short / min(h, w)
    if max_size > 0 and max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


@dataclass
class MapperParams:
    """Augmentation settings (from ``cfg.input``)."""

    min_sizes: Sequence[int]
    max_size: int
    sampling: str = "choice"  # "choice" | "range"
    flip: str = "horizontal"  # "horizontal" | "vertical" | "none"
    is_train: bool = True

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> "MapperParams":
        if is_train:
            return cls(list(cfg.input.min_size_train), int(cfg.input.max_size_train), str(cfg.input.min_size_train_sampling),
                       str(cfg.input.random_flip), True)
        return cls([int(cfg.input.min_size_test)], int(cfg.input.max_size_test), "choice", "none", False)


def _decode_masks(annotations: List[Dict], h: int, w: int, out_h: int, out_w: int) -> np.ndarray:
    """``(M, out_h, out_w)`` bool masks. Polygons are scaled then rasterised at the output size; RLEs are
    decoded at the original size and resized with nearest neighbour."""
    from pycocotools import mask as mask_util

    out = np.zeros((len(annotations), out_h, out_w), dtype=bool)
    sx, sy = out_w / w, out_h / h
    for i, ann in enumerate(annotations):
        seg = ann["segmentation"]
        if isinstance(seg, list):
            polys = [(np.asarray(p, dtype=np.float64).reshape(-1, 2) * (sx, sy)).ravel().tolist() for p in seg]
            m = mask_util.decode(mask_util.merge(mask_util.frPyObjects(polys, out_h, out_w)))
        else:
            m = mask_util.decode(segmentation_to_rle(seg, h, w))
            if m.shape != (out_h, out_w):
                m = cv2.resize(m, (out_w, out_h), interpolation=cv2.INTER_NEAREST)
        out[i] = m.astype(bool)
    return out


class DatasetMapper:
    """Callable ``(record, rng) -> model input dict`` (see the module docstring).

    Raises:
        ImageReadError: the image cannot be decoded or its size differs from the record's (callers skip it).
    """

    def __init__(self, params: MapperParams):
        self.params = params

    def __call__(self, record: Dict, rng: Optional[np.random.Generator] = None) -> Dict:
        p = self.params
        rng = rng if rng is not None else np.random.default_rng()
        image = read_image_rgb(record["file_name"])
        h, w = image.shape[:2]
        if (h, w) != (record["height"], record["width"]):
            raise ImageReadError(record["file_name"], f"decoded size {w}x{h} differs from the annotation's "
                                                      f"{record['width']}x{record['height']}")
        if p.sampling == "range":
            short = int(rng.integers(min(p.min_sizes), max(p.min_sizes) + 1))
        else:
            short = int(p.min_sizes[int(rng.integers(len(p.min_sizes)))]) if len(p.min_sizes) > 1 else int(p.min_sizes[0])
        nh, nw = shortest_edge_size(h, w, short, p.max_size)
        # The flip draw happens whatever the image holds, so later draws do not depend on the content.
        flip = p.is_train and p.flip != "none" and bool(rng.random() < 0.5)
        if (nh, nw) != (h, w):
            image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        if flip:
            image = image[:, ::-1] if p.flip == "horizontal" else image[::-1]
        out = {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
               "height": h, "width": w, "image_id": record.get("image_id"), "file_name": record["file_name"]}
        if not p.is_train:
            return out

        anns = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
        boxes = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes *= (nw / w, nh / h, nw / w, nh / h)
        if flip and p.flip == "horizontal":
            boxes[:, [0, 2]] = nw - boxes[:, [2, 0]]
        elif flip:
            boxes[:, [1, 3]] = nh - boxes[:, [3, 1]]
        boxes = boxes.clip(0, (nw, nh, nw, nh))
        keep = ((boxes[:, 2] - boxes[:, 0]) > 1e-5) & ((boxes[:, 3] - boxes[:, 1]) > 1e-5)
        anns = [a for a, k in zip(anns, keep) if k]
        inst = {"boxes": torch.as_tensor(boxes[keep], dtype=torch.float32),
                "classes": torch.as_tensor([a["category_id"] for a in anns], dtype=torch.int64)}
        if anns and all(a.get("segmentation") is not None for a in anns):
            masks = _decode_masks(anns, h, w, nh, nw)
            if flip:
                masks = masks[:, :, ::-1] if p.flip == "horizontal" else masks[:, ::-1]
            inst["masks"] = torch.from_numpy(np.ascontiguousarray(masks))
        elif not anns:
            inst["masks"] = torch.zeros((0, nh, nw), dtype=torch.bool)
        out["instances"] = inst
        return out
