#!/usr/bin/env python
"""Throughput of the U2Seg panoptic hot paths, each against a reference measured in the same run.

* STEGO label inference (img/s): DINO tokens -> head -> cluster probabilities -> CRF, batched with the torch
  CRF, against the published arrangement (the same network batch, then pydensecrf image by image).
* STEGO training step (img/s): a batch through the frozen ViT, the head and the three pair losses, against the
  same work done one image at a time through the ViT.
* Panoptic inference (img/s): the Panoptic FPN (instances + semantic branch + combination) against the same
  detector without its semantic branch (GeneralizedRCNN), i.e. the cost of the panoptic output.
* The panoptic combination alone (ms/img): ours (one pass over the free pixels for all stuff classes) against
  a per-class loop as Detectron2 writes it.

Random weights: speed does not depend on them. Example (CPU): ``python scripts/bench_panoptic.py --device cpu``.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def bench_stego(args, device):
    from cutler.config.schema import StegoConfig
    from cutler.maskcut.vit import DinoFeatureExtractor
    from cutler.u2seg.stego import (STEGO_CRF, PairWeights, StegoHead, cluster_log_probs, crf_refine,
                                    dino_patch_tokens, stego_pair_losses)

    torch.manual_seed(0)
    ext = DinoFeatureExtractor(args.vit_arch, args.patch_size, "k", "", "auto").to(device)
    head = StegoHead(ext.vit.embed_dim, 70).to(device)
    centroids = torch.nn.functional.normalize(torch.randn(27, 70, device=device), dim=1)
    b, s = args.batch, args.infer_size
    images = torch.randint(0, 255, (b, 3, s, s), dtype=torch.uint8, device=device)
    hwc = images.permute(0, 2, 3, 1).contiguous()

    def probs():
        with torch.no_grad():
            head.eval()
            code = head(dino_patch_tokens(ext, images))
            code = torch.nn.functional.interpolate(code, size=(s, s), mode="bilinear", align_corners=False)
            return cluster_log_probs(code, centroids)

    def ours():
        crf_refine(hwc, probs(), STEGO_CRF, mode="torch")

    def reference():
        crf_refine(hwc, probs(), STEGO_CRF, mode="pydensecrf")

    t_ours, t_ref = _time(ours, args.repeats), _time(reference, args.repeats)
    res = {"stego_infer_img_s": b / t_ours, "stego_infer_ref_img_s": b / t_ref, "stego_infer_speedup": t_ref / t_ours}

    r = args.res
    views = torch.randint(0, 255, (b, 3, r, r), dtype=torch.uint8, device=device)
    partners = torch.randint(0, 255, (b, 3, r, r), dtype=torch.uint8, device=device)
    opt = torch.optim.Adam(head.parameters(), lr=5e-4)
    weights = PairWeights.from_config(StegoConfig())
    head.train()

    def step(tokens_fn):
        f, fk = tokens_fn(views), tokens_fn(partners)
        losses = stego_pair_losses(head.dropout(f), head.dropout(fk), head(f), head(fk), weights,
                                   torch.Generator().manual_seed(0))
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()

    def batched(x):
        return dino_patch_tokens(ext, x)

    def per_image(x):
        return torch.cat([dino_patch_tokens(ext, x[i:i + 1]) for i in range(len(x))])

    t_b, t_1 = _time(lambda: step(batched), args.repeats), _time(lambda: step(per_image), args.repeats)
    res.update({"stego_train_img_s": b / t_b, "stego_train_ref_img_s": b / t_1, "stego_train_speedup": t_1 / t_b})
    return res


def _combine_per_class(instances, semantic, overlap, area_thresh, score_thresh):
    """Detectron2's loop order, written plainly: one mask and one sum per stuff class."""
    seg = torch.zeros_like(semantic, dtype=torch.int32)
    n = 0
    for i in torch.argsort(-instances["scores"]).tolist():
        if float(instances["scores"][i]) < score_thresh:
            break
        m = instances["masks"][i]
        area = int(m.sum())
        if area == 0:
            continue
        inter = int((m & (seg > 0)).sum())
        if inter / area > overlap:
            continue
        n += 1
        seg[m & (seg == 0)] = n
    for label in torch.unique(semantic).tolist():
        if label == 0:
            continue
        m = (semantic == label) & (seg == 0)
        if int(m.sum()) < area_thresh:
            continue
        n += 1
        seg[m] = n
    return seg


def bench_panoptic(args, device):
    from cutler.config import load_config
    from cutler.modeling import build_model
    from cutler.modeling.meta_arch.panoptic_fpn import combine_semantic_and_instance_outputs

    base = [f"model.device={device}", "model.sem_seg_head.num_classes=28", "model.roi_heads.num_classes=800",
            "input.min_size_test=%d" % args.det_size, "input.max_size_test=%d" % (args.det_size * 2)]
    torch.manual_seed(0)
    pan = build_model(load_config(args.config, base)).eval()
    det = build_model(load_config(args.config, base + ["model.meta_architecture=GeneralizedRCNN"])).eval()
    det.load_state_dict({k: v for k, v in pan.state_dict().items() if not k.startswith("sem_seg_head")})
    h, w = args.det_size, int(args.det_size * 1.5) // 32 * 32
    inputs = [{"image": torch.randint(0, 255, (3, h, w), dtype=torch.uint8), "height": h, "width": w}
              for _ in range(args.det_batch)]
    t_pan = _time(lambda: pan(inputs), args.repeats)
    t_det = _time(lambda: det(inputs), args.repeats)
    res = {"panoptic_img_s": len(inputs) / t_pan, "instances_only_img_s": len(inputs) / t_det,
           "panoptic_cost_ratio": t_pan / t_det}
    g = torch.Generator().manual_seed(0)
    n, hh, ww = 100, 800, 1200
    boxes = torch.randint(0, 600, (n, 2), generator=g)
    masks = torch.zeros(n, hh, ww, dtype=torch.bool)
    for i, (y, x) in enumerate(boxes.tolist()):
        masks[i, y:y + 150, x:x + 200] = True
    inst = {"masks": masks, "scores": torch.rand(n, generator=g), "classes": torch.randint(0, 800, (n,), generator=g)}
    sem = torch.randint(0, 28, (hh // 40, ww // 40), generator=g).repeat_interleave(40, 0).repeat_interleave(40, 1)
    t_c = _time(lambda: combine_semantic_and_instance_outputs(inst, sem, 0.5, 4096, 0.5), args.repeats)
    t_r = _time(lambda: _combine_per_class(inst, sem, 0.5, 4096, 0.5), args.repeats)
    ours = combine_semantic_and_instance_outputs(inst, sem, 0.5, 4096, 0.5)[0]
    assert torch.equal(ours, _combine_per_class(inst, sem, 0.5, 4096, 0.5)), "the two combinations disagree"
    res.update({"combine_ms": 1e3 * t_c, "combine_ref_ms": 1e3 * t_r, "combine_speedup": t_r / t_c})
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vit-arch", default="small")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=8, help="STEGO images per batch")
    p.add_argument("--infer-size", type=int, default=224, help="STEGO inference (and CRF) side")
    p.add_argument("--res", type=int, default=224, help="STEGO training crop side")
    p.add_argument("--config", default="u2seg/panoptic_r50_800")
    p.add_argument("--det-size", type=int, default=512, help="shortest side of the panoptic inputs")
    p.add_argument("--det-batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=["stego", "panoptic"], default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = torch.device(args.device)
    res = {"device": str(device), "threads": torch.get_num_threads()}
    if args.only in (None, "stego"):
        res.update(bench_stego(args, device))
        print(json.dumps(res), flush=True)
    if args.only in (None, "panoptic"):
        res.update(bench_panoptic(args, device))
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}, indent=1))
    return res


if __name__ == "__main__":
    main()
