#!/usr/bin/env python
"""Benchmark MaskCut: our batched pipeline vs a re-implementation of the published per-image path.

Both run in the same process on the same images with the same (seeded random or --pretrain_path) ViT
weights. Reported:

* end to end img/s of our pipeline (``run_maskcut``: loader workers, batched ViT + NCut, CRF pool,
  chunk writer) and its per-phase seconds, once per ``--crf`` mode (``pydensecrf`` in a process pool,
  ``torch`` = the batched lattice CRF on the pipeline's device), with the agreement of each mode's final
  masks with pydensecrf's (IoU per (image, stage); a mask kept by one mode only counts as IoU 0);
* the published path, one image at a time: PIL decode + Lanczos, ViT on one image, NCut with the
  dense float64 generalized ``scipy.linalg.eigh`` per stage, pydensecrf per mask, resize + RLE;
* the NCut phase alone on identical features: fast batched solver vs the per-image dense path, and
  the agreement figure (mean per-stage mask IoU, fast vs exact; two empty masks count as agreeing);
* with ``--dtype-agreement``: the stage masks from the ViT run at the configured autocast dtype (``--vit-dtype``;
  bf16 on GPU by default) against the ViT in float32, same solver: what reduced precision costs in masks.
  On a CPU pass ``--vit-dtype bfloat16`` to emulate the GPU default.
* with ``--compat-agreement``: the images and stages where the default mode (fast solver, our sign and tie
  conventions) and ``maskcut.compat=published`` give different stage masks, once on identical features (the
  NCut rules alone) and once with each mode's own ViT forward (published: DINO's float32 forward), and how
  often each published rounding-decided choice (``ncut.convention_events``) arises along the published run.

Example::

    python scripts/bench_maskcut.py --num-images 4                    # ViT-B/8 at 480 (the defaults)
    python scripts/bench_maskcut.py --num-images 8 --vit-arch small --patch-size 16 --fixed-size 224
    python scripts/bench_maskcut.py --crf pydensecrf torch --skip-published   # the torch CRF row
    python scripts/bench_maskcut.py --dataset-path datasets/synthetic --num-images 32 --vit-arch small \
        --patch-size 16 --skip-published --crf none --compat-agreement    # default vs published-compatible
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cutler.structures.masks import mask_iou  # noqa: E402
from cutler.structures.rle import rle_iou  # noqa: E402


def stage_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(B, N, h, w)`` bool pairs -> ``(N,)`` mean IoU per stage (both empty = 1)."""
    return mask_iou(a.flatten(2), b.flatten(2), empty=1.0).mean(0)


def final_mask_agreement(ref_json: str, other_json: str) -> dict:
    """Agreement of two MaskCut outputs on the same images: IoU of the masks per (image, stage).

    A mask present in one output only counts as IoU 0 (its CRF-IoU rejection went the other way).
    """
    def load(path):
        with open(path) as f:
            return {(a["image_id"], a["stage"]): a["segmentation"] for a in json.load(f)["annotations"]}

    ref, other = load(ref_json), load(other_json)
    ious = []
    for key in sorted(set(ref) | set(other)):
        if key in ref and key in other:
            ious.append(float(rle_iou([other[key]], [ref[key]])[0, 0]))
        else:
            ious.append(0.0)
    return {"masks_ref": len(ref), "masks_other": len(other), "pairs": len(ious),
            "kept_by_one_only": sum(1 for k in set(ref) ^ set(other)),
            "mean_iou": float(np.mean(ious)) if ious else None, "worst_iou": float(min(ious)) if ious else None}


def compat_agreement(model, batched_features, fast_ncut, fast_masks: torch.Tensor, cfg, grid, batches,
                     names) -> dict:
    """Stage masks of the default mode vs ``compat="published"``: where they differ, and the published
    rounding-decided choices (:func:`cutler.maskcut.ncut.convention_events`) met along the published run,
    with the affinity entries the published dtypes decide otherwise than ours on the same painting."""
    from cutler.maskcut.ncut import binary_graph, convention_events, cosine_similarity, maskcut_patches, published_affinity

    amp = model.extractor.amp_dtype
    model.extractor.match_dino, model.extractor.amp_dtype = True, "float32"  # the published forward
    feats_dino = batched_features()
    model.extractor.match_dino, model.extractor.amp_dtype = False, amp
    feats_ours = batched_features()
    t0 = time.perf_counter()
    pub = [maskcut_patches(feats_dino[b], grid, cfg.n, cfg.tau, cfg.eps, compat="published") for b in batches]
    t_pub = time.perf_counter() - t0
    pub_masks = torch.cat([o.masks for o in pub]).cpu()
    same_feats = torch.cat([f.masks for f in fast_ncut(feats_dino)]).cpu()

    def differing(masks: torch.Tensor) -> dict:
        diff = (masks != pub_masks).flatten(2).any(-1)  # (B, N)
        return {"images": int(diff.any(1).sum()), "stages": int(diff.sum()), "of_images": int(diff.shape[0]),
                "of_stages": int(diff.numel()),
                "pairs": [[names[i], int(t) + 1] for i, t in diff.nonzero().tolist()], "diff": diff}

    rules = differing(same_feats)
    # events along the published run: every solved stage (the first, and those after a kept mask)
    events = {"solved_stages": 0}
    affinity_flips = 0
    sims = cosine_similarity(feats_dino)
    first_diff_causes: dict = {}
    first = torch.where(rules["diff"].any(1), rules["diff"].float().argmax(1), torch.full((pub_masks.shape[0],), -1))
    for t in range(cfg.n):
        ev = [convention_events(o.eigvecs[:, t], grid, o.eigvals[:, t], cfg.gap_tol) for o in pub]
        ev = {k: torch.cat([e[k] for e in ev]) for k in ev[0]}
        solved = torch.ones(pub_masks.shape[0], dtype=torch.bool) if t == 0 else pub_masks[:, t - 1].flatten(1).any(1)
        events["solved_stages"] += int(solved.sum())
        for k, v in ev.items():
            events[k] = events.get(k, 0) + int((v & solved).sum())
        painting = pub_masks[:, :t].flatten(2).any(1)
        for i in solved.nonzero()[:, 0].tolist():
            ours = binary_graph(sims[i:i + 1], cfg.tau, cfg.eps, ~painting[i:i + 1].to(sims.device)).dense()[0]
            theirs = published_affinity(feats_dino[i], None if t == 0 else ~painting[i].to(sims.device), cfg.tau, cfg.eps)
            affinity_flips += int((ours.cpu().numpy() != theirs).sum())
        for i in (first == t).nonzero()[:, 0].tolist():
            cause = "+".join(k for k, v in ev.items() if v[i]) or "none (affinity or solver rounding)"
            first_diff_causes[cause] = first_diff_causes.get(cause, 0) + 1
    rules.pop("diff")
    with_vit = differing(fast_masks)
    with_vit.pop("diff")
    flipped = (cosine_similarity(feats_dino) > cfg.tau) != (cosine_similarity(feats_ours) > cfg.tau)
    return {"published_ncut_s": t_pub, "identical_features": rules,
            "solved_stages_with_event": events, "first_difference_caused_by": first_diff_causes,
            "affinity_entries_published_dtypes_decide_otherwise": affinity_flips,
            "each_mode_own_vit": with_vit,
            "vit_dino_vs_fused_max_abs_diff": float((feats_dino - feats_ours).abs().max()),
            "vit_dino_vs_fused_affinity_entries_flipped": int(flipped.sum())}


def main(argv=None) -> dict:
    from PIL import Image
    from scipy import ndimage

    from cutler.config import MaskCutConfig
    from cutler.maskcut.crf import pydensecrf_refine
    from cutler.maskcut.dataset import list_dataset
    from cutler.maskcut.ncut import cosine_similarity, maskcut_patches, upsample_stage_masks
    from cutler.maskcut.pipeline import MaskCutModel, run_maskcut
    from cutler.maskcut.postprocess import encode_mask, resize_mask
    from cutler.utils.logging import setup_logger

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset-path", help="image folder (default: the synthetic val split)")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--vit-arch", default="base")
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--fixed-size", type=int, default=480)
    p.add_argument("--N", type=int, default=3)
    p.add_argument("--tau", type=float, default=0.15)
    p.add_argument("--pretrain_path", default="")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--crf", nargs="+", default=["pydensecrf"], choices=["pydensecrf", "torch", "none"],
                   help="CRF mode(s) of our end-to-end run; the first is the one compared with the published path")
    p.add_argument("--crf-workers", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = leave as is)")
    p.add_argument("--device", default="auto")
    p.add_argument("--vit-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="ViT autocast dtype (auto: bf16 on GPU, float32 on CPU)")
    p.add_argument("--dtype-agreement", action="store_true",
                   help="also compare the stage masks of the --vit-dtype ViT with those of a float32 ViT")
    p.add_argument("--compat-agreement", action="store_true",
                   help="also list the images/stages where the default and the published-compatible modes differ")
    p.add_argument("--skip-published", action="store_true", help="only our pipeline (no dense per-image path)")
    p.add_argument("--published-images", type=int, default=0,
                   help="run the (slow) published per-image path on the first K images only (0 = all)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    setup_logger()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.dataset_path:
        root = args.dataset_path
    else:
        from cutler.data.synthetic import ensure_synthetic_dataset
        root = str(ensure_synthetic_dataset()["val"].image_root)
    records, _ = list_dataset(root)
    records = records[: args.num_images]
    cfg = MaskCutConfig(vit_arch=args.vit_arch, patch_size=args.patch_size, fixed_size=args.fixed_size, n=args.N,
                        tau=args.tau, pretrain_path=args.pretrain_path, batch_size=args.batch_size,
                        num_workers=args.num_workers, crf_workers=args.crf_workers, crf=args.crf[0],
                        device=args.device, chunk_size=64, dtype=args.vit_dtype)
    model = MaskCutModel(cfg)
    dev = model.device
    res = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or ''}".strip(),
           "device": str(dev), "torch_threads": torch.get_num_threads(), "images": len(records),
           "config": {"vit": f"{args.vit_arch}/{args.patch_size}", "fixed_size": args.fixed_size, "N": args.N,
                      "tau": args.tau, "batch_size": args.batch_size, "crf_workers": args.crf_workers, "crf": args.crf,
                      "vit_dtype": args.vit_dtype, "weights": args.pretrain_path or "random (seeded)"},
           "command": " ".join(["python", "scripts/bench_maskcut.py"] + list(argv if argv is not None else sys.argv[1:]))}

    # ---- ours, end to end, once per CRF mode (same model, same images)
    from dataclasses import replace

    from cutler.maskcut.writer import merge_outputs

    by_crf, merged = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.crf:
            out_dir = os.path.join(tmp, mode)
            s = run_maskcut(replace(cfg, crf=mode), records, out_dir, progress=False, model=model)
            by_crf[mode] = {"wall_s": s["wall_s"], "img_per_s": s["img_per_s"], "phase_s": s["phase_s"],
                            "masks": s["annotations"], "crf_masks_per_crf_s": None}
            # CRF throughput per second of CRF time: for pydensecrf that time is summed over the pool's processes
            # (so this is per process), for torch it is the wall time of the batched calls in the main process
            n_crf = int(s["stage_status"].get("kept", 0))
            if mode != "none" and s["phase_s"]["crf"] > 0:
                by_crf[mode]["crf_masks_per_crf_s"] = n_crf / s["phase_s"]["crf"]
            merged[mode] = os.path.join(tmp, f"{mode}.json")
            merge_outputs(out_dir, merged[mode])
        if "pydensecrf" in merged:
            res["final_masks_vs_pydensecrf"] = {m: final_mask_agreement(merged["pydensecrf"], merged[m])
                                                for m in merged if m != "pydensecrf"}
    ours = by_crf[args.crf[0]]
    res["ours_end_to_end"] = ours
    res["ours_end_to_end_by_crf"] = by_crf

    # ---- NCut phase on identical features: fast batched vs per-image dense
    from cutler.maskcut.dataset import resize_for_maskcut
    from cutler.utils.image import read_image_rgb

    imgs = [resize_for_maskcut(read_image_rgb(r.path), cfg.fixed_size, cfg.patch_size) for r in records]
    grid = (imgs[0][1].shape[0] // cfg.patch_size, imgs[0][1].shape[1] // cfg.patch_size)
    batches = [slice(i, i + cfg.batch_size) for i in range(0, len(imgs), cfg.batch_size)]

    def batched_features() -> torch.Tensor:
        return torch.cat([model.features([im[1] for im in imgs[b]]) for b in batches])

    def fast_ncut(f: torch.Tensor) -> list:
        return [maskcut_patches(f[b], grid, cfg.n, cfg.tau, cfg.eps, "fast", solver_kwargs=model.solver_kwargs)
                for b in batches]

    feats = batched_features()
    t0 = time.perf_counter()
    fast = fast_ncut(feats)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t_fast = time.perf_counter() - t0
    fast_masks = torch.cat([f.masks for f in fast]).cpu()
    fast_cands = torch.cat([f.candidates for f in fast]).cpu()
    fast_iters = torch.cat([f.iterations for f in fast])
    res["ncut_fast"] = {"s": t_fast, "s_per_img": t_fast / len(imgs),
                        "mean_block_products_per_stage": float(fast_iters[fast_iters > 0].double().mean())
                        if (fast_iters > 0).any() else None,
                        "dense_fallbacks": int((fast_iters < 0).sum())}

    if args.dtype_agreement:
        model.extractor.amp_dtype = "float32"
        feats32 = batched_features()
        model.extractor.amp_dtype = cfg.dtype
        masks32 = torch.cat([f.masks for f in fast_ncut(feats32)]).cpu()
        flipped = (cosine_similarity(feats) > cfg.tau) != (cosine_similarity(feats32) > cfg.tau)
        res["agreement_vit_dtype_vs_float32"] = {
            "vit_dtype": cfg.dtype, "device": str(dev),
            "mean_stage_iou": [float(v) for v in stage_iou(fast_masks, masks32)],
            "affinity_entries_flipped": float(flipped.double().mean()),
            "feature_max_rel_diff": float(((feats.float() - feats32).norm(dim=-1) / feats32.norm(dim=-1).clamp(min=1e-12)).max())}

    if args.compat_agreement:
        res["default_vs_published_compat"] = compat_agreement(model, batched_features, fast_ncut, fast_masks, cfg,
                                                              grid, batches, [r.file_name for r in records])

    if not args.skip_published:
        # ---- the published per-image path, re-implemented (same weights, one image at a time)
        ph = dict.fromkeys(("decode", "vit", "ncut", "crf", "encode"), 0.0)
        exact_masks, exact_cands = [], []
        n_masks = 0
        pub_records = records[: args.published_images] if args.published_images > 0 else records
        t_all = time.perf_counter()
        for r in pub_records:
            t = time.perf_counter()
            im = Image.open(r.path).convert("RGB")
            width, height = im.size
            fixed = np.array(im.resize((cfg.fixed_size, cfg.fixed_size), Image.LANCZOS))
            ph["decode"] += time.perf_counter() - t
            t = time.perf_counter()
            f1 = model.features([fixed])
            ph["vit"] += time.perf_counter() - t
            t = time.perf_counter()
            out = maskcut_patches(f1.double().float(), grid, cfg.n, cfg.tau, cfg.eps, "exact")
            ph["ncut"] += time.perf_counter() - t
            exact_masks.append(out.masks.cpu())
            exact_cands.append(out.candidates.cpu())
            up = upsample_stage_masks(out.masks, fixed.shape[:2])[0].cpu().numpy()
            for m in up:
                t = time.perf_counter()
                crf = ndimage.binary_fill_holes(pydensecrf_refine(fixed, m.astype(np.float32)) >= 0.5)
                keep = float(mask_iou(torch.from_numpy(crf).flatten(), torch.from_numpy(m).flatten())) >= 0.5
                ph["crf"] += time.perf_counter() - t
                t = time.perf_counter()
                if keep and encode_mask(resize_mask(crf, width, height)) is not None:
                    n_masks += 1
                ph["encode"] += time.perf_counter() - t
        wall = time.perf_counter() - t_all
        k = len(pub_records)
        res["published_path"] = {"images": k, "wall_s": wall, "img_per_s": k / wall, "phase_s": ph, "masks": n_masks}
        exact = torch.cat(exact_masks)
        iou = stage_iou(fast_masks[:k], exact)
        res["agreement_mean_stage_iou"] = [float(v) for v in iou]
        res["agreement_mean"] = float(iou.mean())
        # candidates = seed components before the stage filters: non-empty whenever the cut is defined
        res["agreement_candidates_mean_stage_iou"] = [float(v) for v in stage_iou(fast_cands[:k], torch.cat(exact_cands))]
        res["nonempty_stage_masks"] = {"fast": int(fast_masks[:k].flatten(2).any(-1).sum()),
                                       "exact": int(exact.flatten(2).any(-1).sum()),
                                       "of": int(exact.shape[0] * exact.shape[1])}
        # per-image ratios: the published path may have run on fewer images (--published-images)
        n = len(records)
        res["speedup"] = {"end_to_end": (wall / k) / (ours["wall_s"] / n),
                          "ncut_phase_same_features": (ph["ncut"] / k) / (t_fast / n),
                          "ncut_phase_pipeline": (ph["ncut"] / k) / max(ours["phase_s"]["ncut"] / n, 1e-9)}

    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
