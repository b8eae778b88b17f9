#!/usr/bin/env python
"""Benchmark and fidelity check of the torch dense CRF against pydensecrf (MaskCut's CRF, 480x480).

Reports masks/s for pydensecrf (1 process; a process pool) and for ``torch_crf_refine`` (CPU; GPU when available),
plus the IoU agreement (mean, worst) between torch and pydensecrf masks over natural-image-like inputs (smooth
gradients, textures, sharp edges, noise) and over the synthetic dataset with MaskCut-like degraded masks.

Example::

    PYTHONPATH=. python scripts/bench_crf.py --size 480 --images 2 --masks-per-image 3 --workers 2

The case generators below are also used by ``tests/test_torch_crf.py``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

KINDS = ("gradient", "texture", "edges", "noise")
PATCH = 8  # MaskCut's ViT patch size: masks come at (H / 8, W / 8) and are upsampled bilinearly


# ------------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------------
def _object_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random ellipse-plus-rectangle object covering roughly 10-40 % of the image."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
    ry, rx = rng.uniform(0.15, 0.3) * h, rng.uniform(0.15, 0.3) * w
    m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    y0, x0 = int(cy + rng.uniform(-0.1, 0.2) * h), int(cx + rng.uniform(-0.3, 0.0) * w)
    m[y0:y0 + int(0.15 * h), x0:x0 + int(0.25 * w)] = True
    return m


def natural_image(kind: str, h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(image (h, w, 3) uint8, object mask (h, w) bool)`` of one natural-image-like kind.

    ``gradient``: smooth colour ramps, object a different smooth ramp with a soft (blurred) boundary;
    ``texture``: sinusoidal/checker textures with different frequencies inside and outside;
    ``edges``: piecewise-constant regions (the object plus distractor rectangles) with sharp edges;
    ``noise``: low-contrast object under strong Gaussian noise.
    """
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    obj = _object_mask(rng, h, w)
    c_bg, c_fg = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    if kind == "gradient":
        bg = c_bg + 60 * np.stack([xx / w, yy / h, (xx + yy) / (h + w)], -1) - 30
        fg = c_fg + 50 * np.stack([yy / h, xx / w, 1 - xx / w], -1) - 25
        soft = obj.astype(np.float32)
        k = max(3, (min(h, w) // 40) | 1)
        import cv2

        soft = cv2.GaussianBlur(soft, (k, k), 0)[..., None]
        img = bg * (1 - soft) + fg * soft
    elif kind == "texture":
        f1, f2 = rng.uniform(4, 12), rng.uniform(14, 30)
        bg = c_bg + 40 * np.sin(2 * np.pi * (xx + 0.5 * yy) / f1)[..., None]
        fg = c_fg + 40 * (((xx // f2) + (yy // f2)) % 2 * 2 - 1)[..., None]
        img = np.where(obj[..., None], fg, bg)
    elif kind == "edges":
        img = np.broadcast_to(c_bg, (h, w, 3)).copy()
        for _ in range(3):
            y0, x0 = rng.integers(0, h - h // 4), rng.integers(0, w - w // 4)
            img[y0:y0 + rng.integers(h // 8, h // 4), x0:x0 + rng.integers(w // 8, w // 4)] = rng.uniform(0, 255, 3)
        img[obj] = c_fg
    elif kind == "noise":
        img = np.where(obj[..., None], c_bg + rng.choice([-1, 1]) * 35, c_bg) + rng.normal(0, 25, (h, w, 3))
    else:
        raise ValueError(kind)
    return np.clip(img, 0, 255).astype(np.uint8), obj


def degrade_mask(gt: np.ndarray, rng: np.random.Generator, mode: str | None = None) -> np.ndarray:
    """MaskCut-like patch-level mask from a full-resolution object mask.

    Block-averages to ``(h / 8, w / 8)`` patches, thresholds, then erodes, dilates or shifts by one patch (``mode``
    random when None). Returns a float mask in {0, 1} at patch resolution.
    """
    import scipy.ndimage as ndi

    h, w = gt.shape
    ph, pw = h // PATCH, w // PATCH
    blocks = gt[:ph * PATCH, :pw * PATCH].reshape(ph, PATCH, pw, PATCH).mean((1, 3)) >= 0.5
    mode = mode or str(rng.choice(["erode", "dilate", "shift", "none"]))
    if mode == "erode" and ndi.binary_erosion(blocks).any():
        blocks = ndi.binary_erosion(blocks)
    elif mode == "dilate":
        blocks = ndi.binary_dilation(blocks)
    elif mode == "shift":
        blocks = np.roll(blocks, (int(rng.integers(-1, 2)), int(rng.integers(-1, 2))), axis=(0, 1))
    return blocks.astype(np.float32)


def natural_cases(size: int, seed: int = 0, kinds=KINDS, masks_per_image: int = 1):
    """``[(image (size, size, 3) uint8, [masks (size/8, size/8) float])]`` one image per kind."""
    rng = np.random.default_rng(seed)
    out = []
    for kind in kinds:
        img, obj = natural_image(kind, size, size, rng)
        out.append((img, [degrade_mask(obj, rng) for _ in range(masks_per_image)]))
    return out


def synthetic_cases(root, size: int, num_images: int, seed: int = 0):
    """Synthetic-dataset images resized to ``size x size`` with degraded GT masks (one per annotated object).

    Args:
        root: datasets root for ``ensure_synthetic_dataset``.
        size: square working size (MaskCut uses 480).
        num_images: images taken from the val split.
    """
    import cv2
    import pycocotools.mask as mask_utils
    from pycocotools.coco import COCO

    from cutler.data.synthetic import ensure_synthetic_dataset

    split = ensure_synthetic_dataset(root=root, num_train=1, num_val=num_images, seed=seed)["val"]
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(split.json_file))
    rng = np.random.default_rng(seed)
    out = []
    for img_id in sorted(coco.getImgIds())[:num_images]:
        info = coco.loadImgs(img_id)[0]
        bgr = cv2.imread(os.path.join(str(split.image_root), info["file_name"]), cv2.IMREAD_COLOR)
        img = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (size, size), interpolation=cv2.INTER_LINEAR)
        masks = []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
            gt = mask_utils.decode(ann["segmentation"]).astype(np.uint8)
            gt = cv2.resize(gt, (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)
            if gt.sum() >= 4 * PATCH * PATCH:  # objects below a few patches do not survive MaskCut anyway
                masks.append(degrade_mask(gt, rng))
        if masks:
            out.append((img, masks))
    return out


# ------------------------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------------------------
def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks (1.0 when both are empty)."""
    import torch

    from cutler.structures.masks import mask_iou

    return float(mask_iou(torch.from_numpy(np.ascontiguousarray(a, dtype=bool)).flatten(),
                          torch.from_numpy(np.ascontiguousarray(b, dtype=bool)).flatten(), empty=1.0))


def _ref_one(args):
    from cutler.maskcut.crf import pydensecrf_refine

    img, mask = args
    return pydensecrf_refine(img, mask)


def make_pool(workers: int) -> ProcessPoolExecutor:
    """A warmed-up process pool for pydensecrf (imports done, so timings exclude start-up)."""
    # spawn, not fork: forking a process whose torch/OpenMP thread pools are live can deadlock the children.
    ex = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    warm = [(np.zeros((16, 16, 3), np.uint8), np.ones((2, 2), np.float32))] * workers
    list(ex.map(_ref_one, warm))
    return ex


def run_pydensecrf(cases, pool: ProcessPoolExecutor | None = None) -> list[np.ndarray]:
    """pydensecrf masks of every (image, mask) pair, in order; in ``pool`` when given, else in this process."""
    jobs = [(img, m) for img, masks in cases for m in masks]
    if pool is None:
        return [_ref_one(j) for j in jobs]
    return list(pool.map(_ref_one, jobs, chunksize=1))


def run_torch(cases, device: str = "cpu", gaussian: str = "lattice") -> list[np.ndarray]:
    """torch CRF masks of every (image, mask) pair, in order: one batched call, each distinct image sent once
    with an index (as the MaskCut pipeline calls it); host-device transfers are part of the timed work."""
    import torch

    from cutler.maskcut.torch_crf import torch_crf_refine

    images = torch.from_numpy(np.stack([img for img, _ in cases])).to(device)
    index = torch.tensor([i for i, (_, masks) in enumerate(cases) for _ in masks], device=device)
    masks = torch.from_numpy(np.stack([m for _, masks in cases for m in masks])).to(device)
    out = torch_crf_refine(images, masks.float(), image_index=index, gaussian=gaussian)
    return list(out.cpu().numpy())


def agreement(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    ious = [iou(a, b) for a, b in zip(ref, got)]
    return {"n": len(ious), "mean_iou": float(np.mean(ious)), "worst_iou": float(np.min(ious))}


def _timed(fn, repeats: int = 1):
    best = float("inf")
    out = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=480)
    p.add_argument("--images", type=int, default=2, help="distinct images per timed batch")
    p.add_argument("--masks-per-image", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="process-pool size for pydensecrf")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default; >1 thrashes on a loaded machine)")
    p.add_argument("--gpu-images", type=int, default=32, help="distinct images per GPU batch")
    p.add_argument("--synthetic-images", type=int, default=4, help="synthetic images for the agreement (0: skip)")
    p.add_argument("--datasets-root", default=None)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    res: dict = {"size": a.size, "images": a.images, "masks_per_image": a.masks_per_image,
                 "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    kinds = [KINDS[i % len(KINDS)] for i in range(a.images)]
    cases = natural_cases(a.size, seed=1, kinds=kinds, masks_per_image=a.masks_per_image)
    n = sum(len(m) for _, m in cases)

    pool = make_pool(a.workers) if a.workers > 1 else None
    ref, t_ref1 = _timed(lambda: run_pydensecrf(cases))
    res["pydensecrf_1proc_masks_per_s"] = n / t_ref1
    if pool is not None:
        _, t_pool = _timed(lambda: run_pydensecrf(cases, pool))
        res[f"pydensecrf_pool{a.workers}_masks_per_s"] = n / t_pool
    got, t_cpu = _timed(lambda: run_torch(cases, "cpu"))
    res["torch_cpu_masks_per_s"] = n / t_cpu
    res["torch_cpu_vs_pydensecrf_1proc"] = t_ref1 / t_cpu
    res["agreement_timed_batch"] = agreement(ref, got)

    # Fidelity over every kind and over the synthetic dataset (one mask per image is enough here).
    fid_cases = natural_cases(a.size, seed=2, kinds=KINDS, masks_per_image=2)
    res["agreement_natural"] = agreement(run_pydensecrf(fid_cases, pool), run_torch(fid_cases, "cpu"))
    res["agreement_natural_exact_gaussian"] = agreement(run_pydensecrf(fid_cases, pool),
                                                        run_torch(fid_cases, "cpu", gaussian="exact"))
    if a.synthetic_images:
        syn = synthetic_cases(a.datasets_root, a.size, a.synthetic_images)
        res["agreement_synthetic"] = agreement(run_pydensecrf(syn, pool), run_torch(syn, "cpu"))

    if torch.cuda.is_available():
        gcases = natural_cases(a.size, seed=3, kinds=[KINDS[i % 4] for i in range(a.gpu_images)],
                               masks_per_image=a.masks_per_image)
        gn = sum(len(m) for _, m in gcases)
        for gaussian in ("lattice", "exact"):  # warm-up (kernels, allocator, spatial-lattice cache)
            run_torch(gcases[:2], "cuda", gaussian=gaussian)
        torch.cuda.synchronize()

        for gaussian in ("lattice", "exact"):
            def gpu_run():
                out = run_torch(gcases, "cuda", gaussian=gaussian)
                torch.cuda.synchronize()
                return out

            _, t_gpu = _timed(gpu_run, repeats=3)
            key = "torch_gpu_masks_per_s" + ("" if gaussian == "lattice" else "_exact_gaussian")
            res[key] = gn / t_gpu
        res["torch_gpu_device"] = torch.cuda.get_device_name()
        res["torch_gpu_batch_masks"] = gn
        res["torch_gpu_vs_pydensecrf_1proc"] = res["torch_gpu_masks_per_s"] / res["pydensecrf_1proc_masks_per_s"]
        # GPU masks vs pydensecrf on the timed CPU batch (same lattice; only float summation order differs)
        res["agreement_gpu_vs_pydensecrf"] = agreement(ref, run_torch(cases, "cuda"))
    else:
        res["torch_gpu_masks_per_s"] = None  # no GPU here: unmeasured

    if pool is not None:
        pool.shutdown()
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
