"""Per-image UnSAM merge step on CPU: part masks back to the image, mask NMS, dense-CRF refinement, filtering,
hierarchy bookkeeping, COCO annotations.

Everything here is a plain function of numpy arrays so that :func:`postprocess_image` can run in a process pool
beside the device work. Masks live in the square frame the detector saw (``S x S``, ``unsam.divide.image_size``)
until the very end, when the survivors are resized to the original image.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_util

from ..data.mapper import resize_uint8
from ..maskcut.crf import CRFParams, pydensecrf_refine
from ..maskcut.postprocess import encode_mask, resize_mask
from ..structures.masks import mask_iou
from ..structures.rle import encode_masks, rle_area, rle_iou
from .hierarchy import cluster_tree, mask_nms, nms_order, resolve_parents


@dataclass(frozen=True)
class MergeSettings:
    """What the merge step needs from ``cfg.unsam`` (picklable)."""

    grid_hw: Tuple[int, int] = (32, 32)
    min_patches: int = 4
    min_coverage: float = 0.9
    nms_iou: float = 0.9
    crf: str = "pydensecrf"  # "pydensecrf" | "precomputed" (outputs given, e.g. by the torch CRF) | "none"
    crf_size: int = 256
    crf_context: float = 2.0
    crf_iou_thresh: float = 0.5
    max_area_fraction: float = 0.9
    crf_params: CRFParams = field(default_factory=CRFParams)

    @classmethod
    def from_config(cls, ucfg, crf_mode: str) -> "MergeSettings":
        c, m = ucfg.conquer, ucfg.merge
        side = int(c.crop_size) // int(c.patch_size)
        return cls((side, side), int(c.min_patches), float(c.min_coverage), float(m.nms_iou), crf_mode,
                   int(m.crf_size), float(m.crf_context), float(m.crf_iou_thresh), float(m.max_area_fraction))


def tight_box(mask: np.ndarray) -> Optional[Tuple[int, int, int, int]]:
    """``(x0, y0, x1, y1)`` pixel box of a bool mask, ends exclusive; None when empty."""
    ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return None
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


@dataclass
class Candidates:
    """The masks of one image in the ``S x S`` frame with their hierarchy (index-aligned lists)."""

    rles: List[dict] = field(default_factory=list)
    levels: List[int] = field(default_factory=list)
    finest_levels: List[int] = field(default_factory=list)
    parents: List[int] = field(default_factory=list)
    scores: List[Optional[float]] = field(default_factory=list)
    boxes: List[Tuple[int, int, int, int]] = field(default_factory=list)

    def add(self, mask: np.ndarray, box, level: int, finest: int, parent: int, score: Optional[float]) -> int:
        self.rles.append(encode_masks(mask[None])[0])
        self.levels.append(level)
        self.finest_levels.append(finest)
        self.parents.append(parent)
        self.scores.append(score)
        self.boxes.append(tuple(int(v) for v in box))
        return len(self.rles) - 1

    def __len__(self) -> int:
        return len(self.rles)


def build_candidates(divide_masks: Sequence[np.ndarray], scores: Sequence[float],
                     level_labels: Sequence[Optional[np.ndarray]], settings: MergeSettings) -> Tuple[Candidates, dict]:
    """Divide masks (level 0) and the parts of their merge hierarchies, mapped back to the ``S x S`` frame.

    Args:
        divide_masks: ``(S, S)`` bool masks kept from the detector.
        scores: their detector scores.
        level_labels: per divide mask, ``(L, N)`` cluster ids after each merging level (see
            :func:`cutler.unsam.merging.iterative_merge`), or None when its box was not conquered.
        settings: merge settings.

    A part (a cluster of ``>= min_patches`` patches) is resized from the patch grid to its divide mask's box
    (bicubic on a 0/255 image, cut at half the maximum, as MaskCut and the published code resize masks) and
    kept when more than ``min_coverage`` of it lies inside the divide mask (the published code's filter of
    background clusters of the box).

    Returns:
        (candidates, counts ``{"divide", "parts", "parts_kept"}``).
    """
    cand = Candidates()
    counts = {"divide": 0, "parts": 0, "parts_kept": 0}
    gh, gw = settings.grid_hw
    for mask, score, labels in zip(divide_masks, scores, level_labels):
        box = tight_box(mask)
        if box is None:
            continue
        root = cand.add(mask, box, 0, 0, -1, float(score))
        counts["divide"] += 1
        if labels is None:
            continue
        x0, y0, x1, y1 = box
        inside = mask[y0:y1, x0:x1]
        index = {-1: root}
        for k, node in enumerate(cluster_tree(labels, (gh, gw), settings.min_patches)):
            counts["parts"] += 1
            part = resize_mask(node.patches, x1 - x0, y1 - y0)
            area = int(part.sum())
            parent = index.get(node.parent, root)
            if area == 0 or (part & inside).sum() <= settings.min_coverage * area:
                # not a part of this mask: its children hang under its nearest kept ancestor
                index[k] = parent
                continue
            full = np.zeros_like(mask)
            full[y0:y1, x0:x1] = part
            index[k] = cand.add(full, (x0, y0, x1, y1), node.level, node.finest_level, parent, None)
            counts["parts_kept"] += 1
    return cand, counts


def refine_window(box: Tuple[int, int, int, int], size: int, context: float) -> Tuple[int, int, int, int]:
    """The CRF window of a mask: a square of ``context`` times the box's longer side, centred on the box,
    clipped to the ``size x size`` frame (ends exclusive)."""
    x0, y0, x1, y1 = box
    half = max(x1 - x0, y1 - y0) * context / 2.0
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    wx0, wy0 = max(0, int(np.floor(cx - half))), max(0, int(np.floor(cy - half)))
    wx1, wy1 = min(size, int(np.ceil(cx + half))), min(size, int(np.ceil(cy + half)))
    return wx0, wy0, max(wx1, wx0 + 1), max(wy1, wy0 + 1)


def crf_inputs(image: np.ndarray, mask: np.ndarray, window, crf_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """The window of ``image`` and ``mask`` resized to ``crf_size x crf_size``: ``(uint8 RGB, float32 mask)``."""
    x0, y0, x1, y1 = window
    img = np.array(resize_uint8(np.ascontiguousarray(image[y0:y1, x0:x1]), crf_size, crf_size))  # writable copy
    m = cv2.resize(mask[y0:y1, x0:x1].astype(np.float32), (crf_size, crf_size), interpolation=cv2.INTER_LINEAR)
    return img, m


class ImageHierarchy:
    """One image's candidates through NMS, refinement and the final annotations.

    Args:
        image: ``(S, S, 3)`` uint8 RGB, the frame the detector saw.
        width, height: the original image size.
        candidates: from :func:`build_candidates`.
        settings: merge settings.
    """

    def __init__(self, image: np.ndarray, width: int, height: int, candidates: Candidates, settings: MergeSettings):
        self.image, self.width, self.height = image, int(width), int(height)
        self.cand, self.settings = candidates, settings
        n = len(candidates)
        self.alive = np.ones(n, dtype=bool)
        self.replaced_by = np.full(n, -1, dtype=np.int64)
        self.refined: Dict[int, np.ndarray] = {}
        self.stats: Dict[str, int] = {"candidates": n}

    def nms(self) -> None:
        """Mask NMS over all candidates (coarser level first, then larger area)."""
        n = len(self.cand)
        if n == 0:
            self.stats["after_nms"] = 0
            return
        ious = rle_iou(self.cand.rles, self.cand.rles)
        areas = [rle_area(r) for r in self.cand.rles]
        keep, suppressed_by = mask_nms(ious, nms_order(self.cand.levels, areas), self.settings.nms_iou)
        self.alive &= keep
        self.replaced_by = suppressed_by
        self.stats["after_nms"] = int(keep.sum())

    def survivors(self) -> List[int]:
        return [int(i) for i in np.flatnonzero(self.alive)]

    def crf_inputs(self) -> List[Tuple[np.ndarray, np.ndarray]]:
        """``(window image, window mask)`` at ``crf_size`` of every surviving candidate, in :meth:`survivors` order."""
        s = self.settings
        out = []
        for i in self.survivors():
            mask = mask_util.decode(self.cand.rles[i]).astype(bool)
            out.append(crf_inputs(self.image, mask, refine_window(self.cand.boxes[i], mask.shape[0], s.crf_context),
                                  s.crf_size))
        return out

    def apply_refinement(self, outputs: Optional[Sequence[np.ndarray]]) -> None:
        """Take the CRF label maps (``crf_size`` squares, :meth:`survivors` order; None = no refinement) and drop
        the masks that refinement changed too much (IoU < ``crf_iou_thresh``) or that cover more than
        ``max_area_fraction`` of the frame."""
        s = self.settings
        dropped_crf = dropped_area = 0
        for k, i in enumerate(self.survivors()):
            mask = mask_util.decode(self.cand.rles[i]).astype(bool)
            size = mask.shape[0]
            if outputs is not None:
                x0, y0, x1, y1 = refine_window(self.cand.boxes[i], size, s.crf_context)
                refined = np.zeros_like(mask)
                refined[y0:y1, x0:x1] = resize_mask(np.asarray(outputs[k]), x1 - x0, y1 - y0)
                if float(mask_iou(torch.from_numpy(mask).flatten(), torch.from_numpy(refined).flatten())) \
                        < s.crf_iou_thresh:
                    self.alive[i] = False
                    dropped_crf += 1
                    continue
            else:
                refined = mask
            if refined.sum() > s.max_area_fraction * refined.size or not refined.any():
                self.alive[i] = False
                dropped_area += 1
                continue
            self.refined[i] = refined
        self.stats.update(dropped_by_crf=dropped_crf, dropped_by_area=dropped_area)

    def annotations(self) -> List[dict]:
        """COCO annotations (original image size) of the survivors, parents before children.

        Each has ``id`` (local to the image, 1-based), ``segmentation`` (RLE), ``area``, ``bbox``, ``iscrowd``,
        ``category_id``, ``level``, ``finest_level``, ``parent`` (the id of its parent mask, None for a root)
        and, for divide masks, the detector ``score``.
        """
        encoded: Dict[int, dict] = {}
        for i, refined in self.refined.items():
            ann = encode_mask(resize_mask(refined, self.width, self.height))
            if ann is None:
                self.alive[i] = False
            else:
                encoded[i] = ann
        parents = resolve_parents(self.cand.parents, self.alive, self.replaced_by)
        order = sorted(encoded, key=lambda i: (self.cand.levels[i], i))
        out = []
        for i in order:
            ann = encoded[i]
            ann.update(id=i + 1, level=int(self.cand.levels[i]), finest_level=int(self.cand.finest_levels[i]),
                       parent=parents[i] + 1 if parents[i] >= 0 else None)
            if self.cand.scores[i] is not None:
                ann["score"] = round(float(self.cand.scores[i]), 5)
            out.append(ann)
        self.stats["masks"] = len(out)
        for level in sorted(set(a["level"] for a in out)):
            self.stats[f"level_{level}"] = sum(a["level"] == level for a in out)
        return out


def postprocess_image(image: np.ndarray, width: int, height: int, divide_rles: Sequence[dict],
                      scores: Sequence[float], level_labels: Sequence[Optional[np.ndarray]],
                      settings: MergeSettings) -> Tuple[List[dict], dict]:
    """The whole CPU merge step of one image (pydensecrf refinement, or none).

    Args:
        image: ``(S, S, 3)`` uint8 RGB frame.
        width, height: original image size.
        divide_rles: the divide masks as COCO RLEs of the ``S x S`` frame.
        scores: their detector scores.
        level_labels: per divide mask, its ``(L, N)`` merge levels or None.
        settings: merge settings (``crf`` is "pydensecrf" or "none").

    Returns:
        (annotations as :meth:`ImageHierarchy.annotations`, stats with timings in seconds).
    """
    t0 = time.perf_counter()
    masks = [mask_util.decode(r).astype(bool) for r in divide_rles]
    cand, counts = build_candidates(masks, scores, level_labels, settings)
    hier = ImageHierarchy(image, width, height, cand, settings)
    hier.nms()
    t1 = time.perf_counter()
    outputs = None
    if settings.crf == "pydensecrf":
        outputs = [pydensecrf_refine(img, m, settings.crf_params) for img, m in hier.crf_inputs()]
    elif settings.crf != "none":
        raise ValueError(f"postprocess_image runs the 'pydensecrf' CRF or 'none', got {settings.crf!r}")
    t2 = time.perf_counter()
    hier.apply_refinement(outputs)
    anns = hier.annotations()
    stats = {**counts, **hier.stats, "seconds": {"masks": t1 - t0, "crf": t2 - t1,
                                                 "encode": time.perf_counter() - t2}}
    return anns, stats
