"""Record -> model input: decode, resize (shortest edge), flip, annotations -> ``"instances"``.

The output dict is what :func:`cutler.modeling.build.build_model`'s models take::

    {"image": uint8 Tensor[3, H, W] (RGB, resized), "height": int, "width": int (ORIGINAL size),
     "image_id", "file_name",
     "instances": {"boxes": float Tensor[M, 4] XYXY in resized pixels, "classes": int64 Tensor[M],
                   "masks": bool Tensor[M, H, W]},        # training only; "masks" when the data has masks
     "sem_seg": uint8 Tensor[H, W]}                     # training, when the record has a "sem_seg_file_name"

Randomness comes from an explicit ``numpy.random.Generator`` per sample, so the same sample at the same
position of the training stream gets the same augmentation whatever the number of workers or ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from cutler.structures.rle import segmentation_to_rle
from cutler.utils.image import ImageReadError, read_image_rgb

_PIL_FILTERS = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def shortest_edge_size(h: int, w: int, short: int, max_size: int) -> Tuple[int, int]:
    """Output ``(new_h, new_w)`` of Detectron2's ResizeShortestEdge for a ``h x w`` image: shortest edge
    ``short``, longest at most ``max_size`` (``short <= 0`` keeps the size; ``max_size <= 0``: no cap).
    Used for training and testing alike."""
    if short <= 0:
        return h, w
    # Detectron2's float operations in its order: the short side is set to ``short`` exactly and the cap
    # rescales both sides. Computing ``h * (max_size / max(h, w))`` directly is algebraically the same but
    # rounds differently for about one size in 10^4 (e.g. 22x44 at 800/1333: 666 vs 667 rows).
    scale = short / min(h, w)
    new_h, new_w = (float(short), scale * w) if h < w else (scale * h, float(short))
    if max_size > 0 and max(new_h, new_w) > max_size:
        cap = max_size / max(new_h, new_w)
        new_h, new_w = new_h * cap, new_w * cap
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_uint8(array: np.ndarray, new_h: int, new_w: int, interp: str = "bilinear") -> np.ndarray:
    """Resize like Detectron2's ``ResizeTransform`` (the transform of ResizeShortestEdge) does for uint8.

    Detectron2 resamples uint8 arrays with PIL: ``apply_image`` with BILINEAR for images,
    ``apply_segmentation`` with NEAREST for bitmasks. PIL's bilinear widens its kernel when shrinking
    (antialiasing), so OpenCV's or torch's bilinear differ by several grey levels on average.

    Args:
        array: ``(H, W)`` or ``(H, W, C)`` uint8, C in {1, 3, 4} (an image, or a 0/1 mask).
        new_h, new_w: output size in pixels.
        interp: ``"bilinear"`` (images) or ``"nearest"`` (masks).

    Returns:
        ``(new_h, new_w)`` or ``(new_h, new_w, C)`` uint8 (possibly read-only: copy before writing).

    Raises:
        TypeError: ``array`` is not uint8. Detectron2 would use torch's ``F.interpolate`` there, but every
            decoder of this project (``read_image_rgb``, pycocotools) yields uint8, so that path is not kept.
    """
    if array.dtype != np.uint8:
        raise TypeError(f"resize_uint8 needs a uint8 array, got {array.dtype}")
    if array.shape[:2] == (new_h, new_w):
        return array  # PIL returns an unchanged copy at the same size
    single = array.ndim == 3 and array.shape[2] == 1  # PIL has no (H, W, 1) mode: resize it as "L"
    pil = Image.fromarray(np.ascontiguousarray(array[:, :, 0] if single else array))
    out = np.asarray(pil.resize((new_w, new_h), _PIL_FILTERS[interp]))
    return out[:, :, None] if single else out


@dataclass
class MapperParams:
    """Augmentation settings (from ``cfg.input``)."""

    min_sizes: Sequence[int]
    max_size: int
    sampling: str = "choice"  # "choice" | "range"
    flip: str = "horizontal"  # "horizontal" | "vertical" | "none"
    is_train: bool = True
    max_instances: int = 0  # train on at most this many annotations per image, drawn at random (0 = all)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> "MapperParams":
        if is_train:
            return cls(list(cfg.input.min_size_train), int(cfg.input.max_size_train), str(cfg.input.min_size_train_sampling),
                       str(cfg.input.random_flip), True, int(getattr(cfg.dataloader, "max_instances_per_image", 0)))
        return cls([int(cfg.input.min_size_test)], int(cfg.input.max_size_test), "choice", "none", False)


def _decode_masks(annotations: List[Dict], h: int, w: int, out_h: int, out_w: int, flip: str = "none") -> np.ndarray:
    """``(M, out_h, out_w)`` bool masks in the resized (and flipped) image, as Detectron2's bitmask path
    makes them: polygons are scaled and flipped as coordinates, then rasterised at the output size; RLEs
    are decoded at the original size, resized with PIL nearest, then flipped.

    Args:
        flip: ``"none"``, ``"horizontal"`` or ``"vertical"``.
    """
    from pycocotools import mask as mask_util

    out = np.zeros((len(annotations), out_h, out_w), dtype=bool)
    sx, sy = out_w / w, out_h / h
    for i, ann in enumerate(annotations):
        seg = ann["segmentation"]
        if isinstance(seg, list):
            polys = []
            for poly in seg:
                xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2) * (sx, sy)
                # Flip the coordinates, not the raster: pycocotools' rasterisation is not mirror-symmetric
                # (about 1 polygon in 15 differs by a pixel or two), and Detectron2 flips the polygon.
                if flip == "horizontal":
                    xy[:, 0] = out_w - xy[:, 0]
                elif flip == "vertical":
                    xy[:, 1] = out_h - xy[:, 1]
                polys.append(xy.ravel().tolist())
            m = mask_util.decode(segmentation_to_rle(polys, out_h, out_w))
        else:
            m = resize_uint8(mask_util.decode(segmentation_to_rle(seg, h, w)), out_h, out_w, "nearest")
            if flip == "horizontal":
                m = m[:, ::-1]
            elif flip == "vertical":
                m = m[::-1]
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
        image = resize_uint8(image, nh, nw)
        if flip:
            image = image[:, ::-1] if p.flip == "horizontal" else image[::-1]
        out = {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
               "height": h, "width": w, "image_id": record.get("image_id"), "file_name": record["file_name"]}
        if not p.is_train:
            return out

        anns = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
        if 0 < p.max_instances < len(anns):
            # Dense pseudo-masks (hundreds per image): a random subset per sample bounds the cost of decoding and
            # of the losses. Drawn after the flip, and only when needed, so other settings see the same stream.
            anns = [anns[i] for i in np.sort(rng.choice(len(anns), p.max_instances, replace=False))]
        boxes = np.asarray([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes *= (nw / w, nh / h, nw / w, nh / h)
        if flip and p.flip == "horizontal":
            boxes[:, [0, 2]] = nw - boxes[:, [2, 0]]
        elif flip:
            boxes[:, [1, 3]] = nh - boxes[:, [3, 1]]
        boxes = boxes.clip(0, (nw, nh, nw, nh))
        keep = ((boxes[:, 2] - boxes[:, 0]) > 1e-5) & ((boxes[:, 3] - boxes[:, 1]) > 1e-5)
        anns, boxes = [a for a, k in zip(anns, keep) if k], boxes[keep]
        masks = None
        if anns and all(a.get("segmentation") is not None for a in anns):
            masks = _decode_masks(anns, h, w, nh, nw, p.flip if flip else "none")
            # Detectron2's filter_empty_instances also drops by mask (by_mask=True): a mask that vanished
            # in the resize (a thin object shrunk away) would give the mask head an all-zero target.
            nonempty = masks.reshape(len(masks), -1).any(axis=1)
            anns, boxes, masks = [a for a, k in zip(anns, nonempty) if k], boxes[nonempty], masks[nonempty]
        elif not anns:
            masks = np.zeros((0, nh, nw), dtype=bool)
        inst = {"boxes": torch.as_tensor(boxes, dtype=torch.float32),
                "classes": torch.as_tensor([a["category_id"] for a in anns], dtype=torch.int64)}
        if masks is not None:
            inst["masks"] = torch.from_numpy(np.ascontiguousarray(masks))
        out["instances"] = inst
        if record.get("sem_seg_file_name"):
            out["sem_seg"] = _semantic_target(record["sem_seg_file_name"], (h, w), (nh, nw),
                                              p.flip if flip else "none")
        return out


def _semantic_target(path: str, size: Tuple[int, int], out_size: Tuple[int, int], flip: str) -> torch.Tensor:
    """The uint8 label PNG at ``path`` resized (nearest, as Detectron2's ``apply_segmentation``) and flipped like
    the image: ``(out_h, out_w)`` uint8.

    Raises:
        ImageReadError: missing or unreadable file, or a size different from the image's.
    """
    try:
        with Image.open(path) as img:
            sem = np.asarray(img)
    except (OSError, ValueError) as e:
        raise ImageReadError(path, f"semantic target unreadable: {e}") from None
    if sem.ndim != 2 or sem.dtype != np.uint8:
        raise ImageReadError(path, f"semantic target must be a single-channel 8-bit PNG, got {sem.dtype} {sem.shape}")
    if sem.shape != tuple(size):
        raise ImageReadError(path, f"semantic target is {sem.shape[1]}x{sem.shape[0]}, its image {size[1]}x{size[0]}")
    sem = resize_uint8(sem, out_size[0], out_size[1], "nearest")
    if flip == "horizontal":
        sem = sem[:, ::-1]
    elif flip == "vertical":
        sem = sem[::-1]
    return torch.from_numpy(np.array(sem))  # a copy: the resize may hand back a read-only array
