"""Predictions drawn over images: masks, boxes and scores as PNG overlays (``tools/demo.py``)."""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..utils.image import IMAGE_EXTENSIONS, ImageReadError, list_images, read_image_rgb
from ..utils.logging import get_logger
from ..utils.visualization import overlay_instances, overlay_panoptic, save_rgb_png
from .inference import prepare_input

logger = get_logger(__name__)


def collect_inputs(paths: Sequence[str]) -> List[Path]:
    """Image files from files, folders (recursive) and glob patterns, in the given order, without repeats."""
    out: List[Path] = []
    for p in paths:
        if os.path.isdir(p):
            found = [Path(p) / rel for rel in list_images(p)]
        elif os.path.isfile(p):
            found = [Path(p)]
        else:
            found = [Path(f) for f in sorted(glob.glob(p, recursive=True))
                     if os.path.splitext(f)[1].lower() in {e.lower() for e in IMAGE_EXTENSIONS}]
            if not found:
                logger.warning("no image matches %s", p)
        out.extend(f for f in found if f not in out)
    return out


def predict(model: Any, image: np.ndarray, min_size: int, max_size: int) -> Dict[str, np.ndarray]:
    """One image through the detector: ``{"boxes": [N,4] XYXY, "scores": [N], "masks": [N,H,W] bool?}``."""
    with torch.inference_mode():
        inst = model([prepare_input(image, min_size, max_size)])[0]["instances"]
    return {k: v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v) for k, v in inst.items()}


def run_demo(model: Any, inputs: Sequence[str], output_dir: os.PathLike | str, min_size: int = 800,
             max_size: int = 1333, confidence: float = 0.5, thing_names: Optional[Dict[int, str]] = None,
             stuff_names: Optional[Dict[int, str]] = None) -> List[Path]:
    """Write ``<output_dir>/<image stem>.png`` overlays of the detections scoring at least ``confidence``; for a
    panoptic model, its panoptic output (stuff coloured per class, things labelled with ``thing_names`` or their
    cluster id ``class + 1``).

    Unreadable images are skipped with a warning. Returns the written paths.
    """
    if isinstance(model, torch.nn.Module):
        model.eval()
    output_dir = Path(output_dir)
    written: List[Path] = []
    names: set = set()
    files = collect_inputs(inputs)
    if not files:
        logger.warning("no input images found in %s", list(inputs))
    for path in files:
        try:
            image = read_image_rgb(path)
        except ImageReadError as e:
            logger.warning("skipping %s: %s", path, e.reason)
            continue
        with torch.inference_mode():
            result = model([prepare_input(image, min_size, max_size)])[0]
        if "panoptic_seg" in result:
            seg, segments = result["panoptic_seg"]
            shown = [dict(s, category_id=int(s["category_id"]) + 1) if s["isthing"] else s for s in segments]
            vis = overlay_panoptic(image, seg.cpu().numpy(), shown, thing_names, stuff_names)
            logger.info("%s: %d things, %d stuff segments", path, sum(s["isthing"] for s in segments),
                        sum(not s["isthing"] for s in segments))
        else:
            inst = {k: v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)
                    for k, v in result["instances"].items()}
            keep = inst["scores"] >= confidence
            masks = inst["masks"][keep] if "masks" in inst else None
            vis = overlay_instances(image, masks=masks, boxes=inst["boxes"][keep], scores=inst["scores"][keep].tolist())
            logger.info("%s: %d of %d detections >= %.2f", path, int(keep.sum()), len(keep), confidence)
        stem = path.stem
        while stem in names:  # same file name from two folders: keep both
            stem += "_"
        names.add(stem)
        out = output_dir / f"{stem}.png"
        save_rgb_png(out, vis)
        logger.info("-> %s", out)
        written.append(out)
    return written
