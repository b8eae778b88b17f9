#!/usr/bin/env python
"""Benchmark UnSAM's conquer step: batched merging on the device against the plain sequential reference.

Both paths start from the same crops (boxes of the synthetic_parts objects, resized to ``--crop-size``) and the
same DINO keys (one batched ViT pass, seeded random weights unless ``--pretrain-path``), then

* ours: :func:`cutler.unsam.merging.iterative_merge` over batches of crops;
* reference: the one-pair-at-a-time implementation kept in ``tests/unsam_reference.py``, crop by crop;

and both turn every crop's levels into part masks at the box size (:func:`cutler.unsam.hierarchy.cluster_tree`
and the published bicubic resize). Reported, for each path and in the same run: crops/s and part masks/s of
the conquer step (ViT + merging + masks), the merging phase alone, and the agreement of the hierarchies (the
fraction of crops whose every level is identical; it must be 1).

Example::

    PYTHONPATH=. python scripts/bench_unsam.py --num-crops 32 --reference-crops 8     # ViT-B/8, 256 px, CPU
    python scripts/bench_unsam.py --device cuda --num-crops 1024 --batch-size 256 --reference-crops 16 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_crops(num_crops: int, crop_size: int, root: str, seed: int = 0):
    """``(crops (K, 3, S, S) float in [0, 1], boxes [(w, h)])`` from the synthetic_parts objects' boxes."""
    from pycocotools.coco import COCO
    from torchvision.ops import roi_align

    from cutler.data.synthetic import ensure_synthetic_dataset
    from cutler.utils.image import read_image_rgb

    per_image = 3
    split = ensure_synthetic_dataset(root, num_train=max(4, num_crops // per_image + 4), num_val=1, seed=seed,
                                     parts=True)["train"]
    coco = COCO(str(split.json_file))
    crops, sizes = [], []
    for img_id in sorted(coco.imgs):
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id)) if a["level"] == 0]
        image = torch.from_numpy(read_image_rgb(split.image_root / coco.imgs[img_id]["file_name"]))
        image = image.permute(2, 0, 1)[None].float()
        for a in anns:
            x, y, w, h = a["bbox"]
            box = torch.tensor([[0.0, x, y, x + w, y + h]])
            crops.append(roi_align(image, box, crop_size, 1.0, 0, aligned=True)[0] / 255.0)
            sizes.append((max(1, int(round(w))), max(1, int(round(h)))))
            if len(crops) == num_crops:
                return torch.stack(crops), sizes
    while len(crops) < num_crops:  # few objects: reuse them
        crops.append(crops[len(crops) % len(sizes)])
        sizes.append(sizes[len(sizes) % len(sizes)])
    return torch.stack(crops), sizes


def part_masks(labels: np.ndarray, grid, size, min_patches: int) -> int:
    """The part masks of one crop at its box size (as the merge step makes them); returns how many."""
    from cutler.maskcut.postprocess import resize_mask
    from cutler.unsam.hierarchy import cluster_tree

    nodes = cluster_tree(labels, grid, min_patches)
    for node in nodes:
        resize_mask(node.patches, size[0], size[1])
    return len(nodes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-crops", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32, help="crops merged together (ours)")
    p.add_argument("--reference-crops", type=int, default=8, help="crops also run through the sequential reference")
    p.add_argument("--vit-arch", default="base", choices=["small", "base"])
    p.add_argument("--patch-size", type=int, default=8, choices=[8, 16])
    p.add_argument("--crop-size", type=int, default=256)
    p.add_argument("--pretrain-path", default="", help="DINO checkpoint (default: seeded random weights)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    p.add_argument("--min-patches", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    p.add_argument("--root", default="output/bench_unsam/datasets", help="where the synthetic_parts set goes")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)

    from cutler.maskcut.vit import DinoFeatureExtractor
    from cutler.unsam.merging import iterative_merge, quantize_features
    from cutler.utils.device import resolve_device
    from unsam_reference import iterative_merge_reference

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    torch.manual_seed(0)
    crops, sizes = synthetic_crops(a.num_crops, a.crop_size, a.root)
    grid = (a.crop_size // a.patch_size,) * 2
    vit = DinoFeatureExtractor(a.vit_arch, a.patch_size, "k", a.pretrain_path).to(device)
    t0 = time.perf_counter()
    feats = torch.cat([vit(crops[i:i + 32].to(device)) for i in range(0, len(crops), 32)])
    _sync(device)
    t_vit = time.perf_counter() - t0
    q = quantize_features(feats)
    _sync(device)

    # ours: batched merging on the device
    t0 = time.perf_counter()
    labels = torch.cat([iterative_merge(q[i:i + a.batch_size], grid, a.thresholds, quantized=True).labels.cpu()
                        for i in range(0, len(q), a.batch_size)]).numpy()
    t_merge = time.perf_counter() - t0
    t0 = time.perf_counter()
    masks = sum(part_masks(labels[k], grid, sizes[k], a.min_patches) for k in range(len(labels)))
    t_masks = time.perf_counter() - t0

    # the sequential reference on the first crops, with the same features
    k_ref = min(a.reference_crops, len(q))
    q_cpu = q[:k_ref].cpu().numpy()
    t0 = time.perf_counter()
    ref = [iterative_merge_reference(q_cpu[k], grid, a.thresholds) for k in range(k_ref)]
    t_ref_merge = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref_masks = sum(part_masks(ref[k], grid, sizes[k], a.min_patches) for k in range(k_ref))
    t_ref_masks = time.perf_counter() - t0
    agree = float(np.mean([np.array_equal(ref[k], labels[k]) for k in range(k_ref)])) if k_ref else float("nan")
    merges = [int(len(np.unique(labels[k][-1]))) for k in range(len(labels))]

    n = len(q)
    vit_per_crop = t_vit / n
    ours_s = t_vit + t_merge + t_masks
    ref_per_crop = vit_per_crop + (t_ref_merge + t_ref_masks) / max(k_ref, 1)
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"threads {torch.get_num_threads()}",
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "setting": {"vit": f"{a.vit_arch}/{a.patch_size}", "crop_size": a.crop_size, "grid": list(grid),
                    "feature_dim": int(q.shape[-1]), "thresholds": a.thresholds, "crops": n, "batch_size": a.batch_size,
                    "reference_crops": k_ref, "weights": a.pretrain_path or "random (seeded)"},
        "clusters_at_coarsest_level_mean": float(np.mean(merges)),
        "ours": {"crops_per_s": n / ours_s, "part_masks_per_s": masks / ours_s, "part_masks": masks,
                 "merge_crops_per_s": n / t_merge, "seconds": {"vit": t_vit, "merge": t_merge, "masks": t_masks}},
        "reference": {"crops_per_s": 1.0 / ref_per_crop,
                      "part_masks_per_s": ref_masks / (ref_per_crop * max(k_ref, 1)),
                      "merge_crops_per_s": k_ref / t_ref_merge if t_ref_merge else float("nan"),
                      "seconds": {"vit (same pass, per crop)": vit_per_crop, "merge": t_ref_merge,
                                  "masks": t_ref_masks}},
        "hierarchy_agreement": agree,
    }
    res["ratio_conquer"] = res["ours"]["crops_per_s"] / res["reference"]["crops_per_s"]
    res["ratio_merge"] = res["ours"]["merge_crops_per_s"] / res["reference"]["merge_crops_per_s"]
    print(json.dumps(res, indent=2))
    if a.json:
        from cutler.utils.io import atomic_write_json

        atomic_write_json(a.json, res, indent=2)
    return res


if __name__ == "__main__":
    main()
