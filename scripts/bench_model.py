#!/usr/bin/env python
"""Throughput and peak memory of our detector vs torchvision's Mask R-CNN R50-FPN, same run, same inputs.

Measures, for each batch size: forward (eval, no grad) and forward+backward (train losses summed,
``backward()``) images/s (wall clock), CPU seconds per image (``time.process_time``, all threads; on a
shared machine this is the fairer comparison), and peak memory (GPU: ``torch.cuda.max_memory_allocated``; CPU: peak RSS
of a fresh subprocess per measurement, minus its RSS once the model is built, i.e. the memory the
step itself needs).

Both models: ResNet-50-FPN with trainable BatchNorm (torchvision's choice without pretrained
weights; our ``model.resnets.norm=BN``, ``freeze_at=0``), 91 logits (ours ``num_classes=90`` + bg),
RPN pre/post-NMS top-k 2000/2000 (train) and 1000/1000 (test) like torchvision's defaults, random
weights. Inputs are 800 x 1066 RGB images (torchvision's own transform keeps that size) with 8
synthetic boxes+masks each for the training step.

``--parts rpn`` compares backbone+FPN+RPN only (ours: ProposalNetwork; torchvision: transform +
backbone + rpn of the same model).

``--opts`` passes config overrides to our model (``solver.amp.enabled=true solver.amp.dtype=bfloat16``,
``model.channels_last=true``). ``BENCH_H``/``BENCH_W`` (environment) change the input size for smoke
tests only: torchvision's transform resizes every input to a shortest edge of 800 anyway.

Example: ``PYTHONPATH=. python scripts/bench_model.py --batch-sizes 1 2 4 --iters 2 --warmup 1``
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

HEIGHT, WIDTH, NUM_GT = int(os.environ.get("BENCH_H", 800)), int(os.environ.get("BENCH_W", 1066)), 8


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _inputs(batch: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch):
        img = torch.randint(0, 256, (3, HEIGHT, WIDTH), dtype=torch.uint8, generator=g)
        xy = torch.rand(NUM_GT, 2, generator=g) * torch.tensor([WIDTH * 0.7, HEIGHT * 0.7])
        wh = 32 + torch.rand(NUM_GT, 2, generator=g) * 200
        boxes = torch.cat([xy, xy + wh], dim=1).round()
        masks = torch.zeros(NUM_GT, HEIGHT, WIDTH, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):  # setup only, not timed
            masks[i, y0:y1, x0:x1] = True
        images.append(img)
        targets.append({"boxes": boxes, "classes": torch.zeros(NUM_GT, dtype=torch.long), "masks": masks})
    return images, targets


class Ours:
    def __init__(self, parts: str, device: torch.device, opts=()):
        from cutler.config import load_config
        from cutler.modeling import build_model

        overrides = [f"model.device={device}", "model.resnets.norm=BN", "model.backbone.freeze_at=0",
                     "model.resnets.stride_in_1x1=false", "model.mask_on=true", "model.roi_heads.num_classes=90",
                     "model.roi_heads.name=StandardROIHeads", "model.roi_box_head.name=FastRCNNConvFCHead",
                     "model.roi_box_head.num_fc=2", "model.roi_box_head.pooler_resolution=7",
                     "model.roi_mask_head.num_conv=4", "model.rpn.post_nms_topk_train=2000",
                     "model.pixel_mean=[123.675,116.28,103.53]", "model.pixel_std=[58.395,57.12,57.375]"]
        if parts == "rpn":
            overrides.append("model.meta_architecture=ProposalNetwork")
        self.model = build_model(load_config(None, overrides + list(opts)))
        self.device = device

    def step(self, images, targets, train: bool):
        if train:
            self.model.train()
            batch = [{"image": im, "instances": t} for im, t in zip(images, targets)]
            loss = sum(self.model(batch).values())
            loss.backward()
            self.model.zero_grad(set_to_none=True)
        else:
            self.model.eval()
            with torch.no_grad():
                self.model([{"image": im} for im in images])


class TorchVision:
    def __init__(self, parts: str, device: torch.device, opts=()):
        from torchvision.models.detection import maskrcnn_resnet50_fpn

        self.model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).to(device)
        self.parts = parts
        self.device = device

    def step(self, images, targets, train: bool):
        m = self.model
        m.train(train)
        imgs = [im.to(self.device).float() / 255.0 for im in images]
        tv_targets = [{"boxes": t["boxes"].to(self.device), "labels": t["classes"].to(self.device) + 1,
                       "masks": t["masks"].to(self.device).to(torch.uint8)} for t in targets]
        with torch.set_grad_enabled(train):
            if self.parts == "rpn":
                image_list, tv_targets = m.transform(imgs, tv_targets if train else None)
                feats = m.backbone(image_list.tensors)
                _, losses = m.rpn(image_list, feats, tv_targets)
            else:
                out = m(imgs, tv_targets if train else None)
                losses = out if train else {}
        if train:
            sum(losses.values()).backward()
            m.zero_grad(set_to_none=True)


def measure(impl: str, parts: str, batch: int, train: bool, iters: int, warmup: int, device: torch.device,
            opts=()) -> dict:
    torch.manual_seed(0)
    model = (Ours if impl == "ours" else TorchVision)(parts, device, opts)
    images, targets = _inputs(batch, device)
    if device.type == "cuda":
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    base_rss = _rss_mb()  # model + inputs; the difference to the peak is what the step needs
    for _ in range(warmup):
        model.step(images, targets, train)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        model.step(images, targets, train)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0  # all threads of this process: robust to other jobs on a shared CPU
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _peak_rss_mb() - base_rss
    return {"impl": impl, "parts": parts, "batch": batch, "mode": "fwd+bwd" if train else "fwd",
            "img_per_s": batch * iters / dt, "cpu_s_per_img": cpu / (batch * iters), "peak_mb": peak, "device": str(device),
            "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--parts", choices=["full", "rpn"], default="full")
    ap.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    ap.add_argument("--impls", nargs="+", choices=["ours", "torchvision"], default=["ours", "torchvision"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default="", help="also write the results to this file")
    ap.add_argument("--opts", nargs="*", default=[],
                    help="config overrides for OUR model, e.g. solver.amp.enabled=true model.channels_last=true")
    ap.add_argument("--_single", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args._single:  # child process: one measurement, fresh memory accounting
        impl, batch, mode = args._single.split(",")
        print(json.dumps(measure(impl, args.parts, int(batch), mode == "fwd+bwd", args.iters, args.warmup, device,
                                 args.opts)))
        return
    rows = []
    for batch in args.batch_sizes:
        for mode in args.modes:
            for impl in args.impls:
                cmd = [sys.executable, __file__, "--_single", f"{impl},{batch},{mode}", "--parts", args.parts,
                       "--iters", str(args.iters), "--warmup", str(args.warmup), "--device", args.device,
                       "--opts", *args.opts]
                out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                if out.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{row['impl']:12s} {row['parts']:4s} batch {batch} {row['mode']:8s} "
                      f"{row['img_per_s']:7.3f} img/s  {row.get('cpu_s_per_img', float('nan')):7.1f} CPU-s/img  "
                      f"peak {row['peak_mb']:8.0f} MB", flush=True)
    print("\nratio ours/torchvision (throughput; memory)")
    for batch in args.batch_sizes:
        for mode in args.modes:
            sel = {r["impl"]: r for r in rows if r["batch"] == batch and r["mode"] == mode}
            if {"ours", "torchvision"} <= set(sel):
                o, t = sel["ours"], sel["torchvision"]
                print(f"batch {batch} {mode:8s} speed x{o['img_per_s'] / t['img_per_s']:.2f}  "
                      f"CPU time x{o['cpu_s_per_img'] / t['cpu_s_per_img']:.2f}  "
                      f"memory x{o['peak_mb'] / t['peak_mb']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
