"""Single-image MaskCut: masks overlaid on the picture (and optionally the stage eigenvectors beside it)."""
from __future__ import annotations

import argparse
import os
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ..config import add_config_arguments, config_from_args
from ..utils.image import read_image_rgb
from ..utils.logging import get_logger, setup_logger
from ..utils.seed import seed_everything
from ..utils.visualization import overlay_instances, save_rgb_png
from .cli import DEMO_OVERRIDES
from .crf import CRFParams

logger = get_logger(__name__)


def eigvec_panels(eigvecs: np.ndarray, grid_hw: Tuple[int, int], height: int) -> np.ndarray:
    """``(N, P)`` eigenvectors -> one ``(height, N * height', 3)`` uint8 strip of colour maps (one per stage)."""
    panels = []
    for x in eigvecs:
        v = x.reshape(grid_hw)
        v = (v - v.min()) / (v.max() - v.min() + 1e-12)
        img = cv2.applyColorMap((v * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)[:, :, ::-1]
        w = max(1, int(round(height * grid_hw[1] / grid_hw[0])))
        panels.append(cv2.resize(img, (w, height), interpolation=cv2.INTER_NEAREST))
    return np.concatenate(panels, axis=1)


def run_demo(image_path: str, cfg, output: str, show_eigvecs: bool = False) -> Tuple[np.ndarray, List[dict]]:
    """MaskCut on one image; writes ``output`` (PNG) and returns (picture, annotations)."""
    from pycocotools import mask as mask_util

    from .dataset import resize_for_maskcut
    from .pipeline import MaskCutModel, resolve_crf_mode
    from .postprocess import postprocess_image

    image = read_image_rgb(image_path, min_size=cfg.patch_size)
    fixed, resized = resize_for_maskcut(image, cfg.fixed_size, cfg.patch_size)
    model = MaskCutModel(cfg)
    crf = resolve_crf_mode(cfg.crf, model.device)
    out, up = model.image_masks([resized], out_hw=fixed.shape[:2])
    crf_out = None
    if crf == "torch":
        from .pipeline import _torch_crf

        crf_out = _torch_crf([{"image": fixed}], up, CRFParams(), model.device, {})[0]
    anns, _ = postprocess_image(fixed, up[0], image.shape[1], image.shape[0],
                                "precomputed" if crf_out is not None else crf, crf_out, cfg.crf_iou_thresh)
    masks = np.stack([mask_util.decode(a["segmentation"]).astype(bool) for a in anns]) if anns else None
    boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                      for a in anns]) if anns else None
    pic = overlay_instances(image, masks, boxes, labels=[f"stage {a['stage'] + 1}" for a in anns] or None)
    if show_eigvecs:
        grid = (resized.shape[0] // cfg.patch_size, resized.shape[1] // cfg.patch_size)
        pic = np.concatenate([pic, eigvec_panels(out.eigvecs[0].cpu().numpy(), grid, pic.shape[0])], axis=1)
    save_rgb_png(output, pic)
    logger.info("%d masks -> %s", len(anns), output)
    return pic, anns


def main(argv: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, List[dict]]:
    """``maskcut/demo.py`` command line."""
    p = argparse.ArgumentParser(prog="demo.py", description="MaskCut on one image, masks drawn over it")
    p.add_argument("--img-path", help="image (default: the first synthetic validation image, random ViT-S/16 weights)")
    p.add_argument("--output", default="output/maskcut_demo.png", help="PNG to write")
    p.add_argument("--show-eigvecs", action="store_true", help="append the per-stage eigenvector maps")
    p.add_argument("--vit-arch", choices=["small", "base"])
    p.add_argument("--vit-feat", choices=["k", "q", "v", "kqv"])
    p.add_argument("--patch-size", type=int, choices=[8, 16])
    p.add_argument("--tau", type=float)
    p.add_argument("--fixed_size", "--fixed-size", dest="fixed_size", type=int)
    p.add_argument("--pretrain_path", "--pretrain-path", dest="pretrain_path")
    p.add_argument("--N", type=int)
    p.add_argument("--crf", choices=["pydensecrf", "torch", "none", "auto"])
    p.add_argument("--cpu", action="store_true")
    add_config_arguments(p)
    args = p.parse_args(argv)
    from .cli import args_to_overrides

    for name in ("dataset_path", "out_dir", "num_folder_per_job", "job_index", "batch_size", "num_workers",
                 "shard_index", "num_shards", "image_root", "solver", "chunk_size", "crf_workers", "threads"):
        setattr(args, name, None)
    overrides = args_to_overrides(args)
    img = args.img_path
    if not img:
        from ..data.synthetic import ensure_synthetic_dataset
        from ..utils.image import list_images

        root = str(ensure_synthetic_dataset()["val"].image_root)
        img = os.path.join(root, list_images(root)[0])
        given = {o.split("=")[0] for o in overrides + list(args.overrides)}
        overrides = [f"maskcut.{k}={v}" for k, v in DEMO_OVERRIDES.items() if f"maskcut.{k}" not in given] + overrides
    setup_logger()
    root_cfg = config_from_args(args, overrides)
    cfg = root_cfg.maskcut
    seed_everything(root_cfg.seed if root_cfg.seed >= 0 else 0)
    return run_demo(img, cfg, args.output, args.show_eigvecs)
