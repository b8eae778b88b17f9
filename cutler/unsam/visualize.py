"""Pictures of UnSAM hierarchies: one panel per level, masks coloured by the tree they belong to.

Panel ``0`` shows the divide masks; panel ``t >= 1`` the masks present at level ``t`` (``level <= t <=
finest_level``), i.e. the partition at that merging threshold as it survived NMS and refinement. A mask's
colour is its root's hue, lighter with depth, so the parts of one object read as one family; its parent's
outline is drawn in white under it.
"""
from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_util

from ..structures.rle import segmentation_to_rle
from ..utils.visualization import save_rgb_png


def _roots_and_depths(anns: Sequence[Mapping]) -> Dict[int, tuple]:
    by_id = {a["id"]: a for a in anns}
    out = {}
    for a in anns:
        node, depth, seen = a, 0, set()
        while node.get("parent") is not None and node["parent"] in by_id and node["id"] not in seen:
            seen.add(node["id"])
            node, depth = by_id[node["parent"]], depth + 1
        out[a["id"]] = (node["id"], depth)
    return out


def _decode(ann: Mapping, height: int, width: int) -> np.ndarray:
    return mask_util.decode(segmentation_to_rle(ann["segmentation"], height, width)).astype(bool)


def hierarchy_levels(anns: Sequence[Mapping]) -> List[int]:
    """The levels drawn for these annotations: 0 (if any root) and every level a part exists at."""
    levels = set()
    for a in anns:
        lo = int(a.get("level", 0))
        hi = int(a.get("finest_level", lo))
        levels.update(range(lo, hi + 1))
    return sorted(levels)


def draw_hierarchy(image: np.ndarray, anns: Sequence[Mapping], panel_width: int = 320,
                   columns: int = 4, title: str = "") -> np.ndarray:
    """Panels of the hierarchy of one image.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        anns: COCO annotations of this image with ``id``, ``segmentation``, ``level``, ``finest_level`` (optional)
            and ``parent`` (None for roots).
        panel_width: width of each panel in pixels.
        columns: panels per row.
        title: printed above the first panel.

    Returns:
        ``(rows * h, columns * panel_width, 3)`` uint8 RGB picture: the image, then one panel per level.
    """
    h, w = image.shape[:2]
    scale = panel_width / w
    ph = max(1, int(round(h * scale)))
    masks = {a["id"]: cv2.resize(_decode(a, h, w).astype(np.uint8), (panel_width, ph),
                                 interpolation=cv2.INTER_NEAREST).astype(bool) for a in anns}
    base = cv2.resize(image, (panel_width, ph), interpolation=cv2.INTER_AREA)
    family = _roots_and_depths(anns)
    roots = sorted({r for r, _ in family.values()})
    hue = {r: (k * 0.618033988749895) % 1.0 for k, r in enumerate(roots)}

    def colour(ann_id: int) -> tuple:
        root, depth = family[ann_id]
        r, g, b = colorsys.hsv_to_rgb(hue[root], max(0.25, 0.9 - 0.15 * depth), 1.0)
        return int(r * 255), int(g * 255), int(b * 255)

    panels = [_label(base.copy(), title or "image")]
    by_id = {a["id"]: a for a in anns}
    for level in hierarchy_levels(anns):
        shown = [a for a in anns if int(a.get("level", 0)) <= level <= int(a.get("finest_level", a.get("level", 0)))]
        shown.sort(key=lambda a: -int(masks[a["id"]].sum()))  # large first, small parts stay visible on top
        canvas = base.astype(np.float32) * 0.45
        for a in shown:
            m = masks[a["id"]]
            canvas[m] = canvas[m] * 0.3 + np.array(colour(a["id"]), np.float32) * 0.7
        canvas = canvas.clip(0, 255).astype(np.uint8)
        for a in shown:
            parent = by_id.get(a.get("parent"))
            if parent is not None:
                contours, _ = cv2.findContours(masks[parent["id"]].astype(np.uint8), cv2.RETR_EXTERNAL,
                                               cv2.CHAIN_APPROX_NONE)
                cv2.drawContours(canvas, contours, -1, (255, 255, 255), 1)
            contours, _ = cv2.findContours(masks[a["id"]].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(canvas, contours, -1, colour(a["id"]), 1)
        name = "level 0: divide masks" if level == 0 else f"level {level}"
        panels.append(_label(canvas, f"{name} ({len(shown)})"))
    rows = [panels[i:i + columns] for i in range(0, len(panels), columns)]
    blank = np.zeros_like(panels[0])
    return np.concatenate([np.concatenate(r + [blank] * (columns - len(r)), axis=1) for r in rows], axis=0)


def _label(panel: np.ndarray, text: str) -> np.ndarray:
    cv2.rectangle(panel, (0, 0), (panel.shape[1], 18), (0, 0, 0), -1)
    cv2.putText(panel, text, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1, cv2.LINE_AA)
    return panel


def draw_hierarchies_from_json(pseudo_json: os.PathLike | str, image_root: os.PathLike | str,
                               output_dir: os.PathLike | str, limit: int = 0,
                               file_names: Optional[Sequence[str]] = None) -> List[Path]:
    """One ``<stem>_hierarchy.png`` per image of a pseudo-mask JSON (the first ``limit`` images, 0 = all; or
    only the images whose base name is in ``file_names``). Returns the written paths."""
    import json

    from ..utils.image import read_image_rgb

    with open(pseudo_json, encoding="utf-8") as f:
        data = json.load(f)
    by_image: Dict[int, list] = {}
    for a in data.get("annotations", []):
        by_image.setdefault(a["image_id"], []).append(a)
    wanted = {os.path.basename(n) for n in file_names} if file_names else None
    images = [im for im in data["images"] if wanted is None or os.path.basename(im["file_name"]) in wanted]
    if limit:
        images = images[:limit]
    written = []
    for im in images:
        rgb = read_image_rgb(Path(image_root) / im["file_name"])
        out = Path(output_dir) / f"{Path(im['file_name']).stem}_hierarchy.png"
        save_rgb_png(out, draw_hierarchy(rgb, by_image.get(im["id"], []), title=Path(im["file_name"]).name))
        written.append(out)
    return written


def run_hierarchy_demo(ucfg, inputs: Sequence[str], output_dir: os.PathLike | str) -> List[Path]:
    """Divide and conquer each input image with ``ucfg`` (the ``unsam`` config section) and write
    ``<output_dir>/<stem>_hierarchy.png``. Unreadable images are skipped with a warning. Returns the paths."""
    from ..data.mapper import resize_uint8
    from ..evaluation.demo import collect_inputs
    from ..utils.image import ImageReadError, read_image_rgb
    from ..utils.logging import get_logger
    from .divide_conquer import DivideConquerModel, merge_image, merge_settings

    logger = get_logger(__name__)
    model = DivideConquerModel(ucfg)
    settings = merge_settings(ucfg, model.device)
    size = int(ucfg.divide.image_size)
    written = []
    for path in collect_inputs(inputs):
        try:
            rgb = read_image_rgb(path)
        except ImageReadError as e:
            logger.warning("skipping %s: %s", path, e.reason)
            continue
        frame = np.array(resize_uint8(rgb, size, size))
        raw = model([frame])[0]
        anns, stats = merge_image(raw, frame, rgb.shape[1], rgb.shape[0], settings, model.device)
        out = Path(output_dir) / f"{Path(path).stem}_hierarchy.png"
        save_rgb_png(out, draw_hierarchy(rgb, anns, title=Path(path).name))
        logger.info("%s: %d divide masks, %d masks in the hierarchy -> %s", path, stats.get("divide", 0), len(anns), out)
        written.append(out)
    return written
