#!/usr/bin/env python
"""Benchmark the training data pipeline (with / without copy-paste, in the main process / in workers)
and, when the detector is available, training iterations per second.

    python scripts/bench_train.py [--workers 0 2] [--batches 20] [--ims-per-batch 4] [--train-iters 5]
                                  [--config-file tiny/synthetic_cascade.yaml] [--json OUT.json]

Data: the synthetic dataset (generated under a temporary root unless --root is given) with the recipe's
multi-scale sizes unless --min-sizes says otherwise. "main" (num_workers=0) is how the published code
runs copy-paste: on the training process, between GPU steps.
"""
import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def bench_loader(cfg_overrides, num_workers: int, copy_paste: bool, batches: int, warmup: int = 2) -> dict:
    from cutler.config import load_config
    from cutler.data.build import build_train_loader

    cfg = load_config(None, cfg_overrides + [f"dataloader.num_workers={num_workers}",
                                             f"dataloader.copy_paste={str(copy_paste).lower()}"])
    loader = build_train_loader(cfg, seed=0, rank=0, world_size=1)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    n_img, t0, c0 = 0, time.perf_counter(), time.process_time()
    for batch in itertools.islice(it, batches):
        n_img += len(batch["inputs"])
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    del it, loader
    # main_cpu_ms_per_img: CPU time of the training process itself (workers excluded): what data loading
    # takes away from the process that drives the GPU.
    return {"num_workers": num_workers, "copy_paste": copy_paste, "images": n_img, "seconds": round(dt, 3),
            "img_per_s": round(n_img / dt, 2), "main_cpu_ms_per_img": round(1000 * cpu / n_img, 1)}


def bench_train(config_file: str, overrides, iters: int) -> dict:
    from cutler.config import load_config
    from cutler.engine import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(config_file, list(overrides) + [f"solver.max_iter={iters + 2}", f"output_dir={out}",
                                                          "solver.checkpoint_period=0", "solver.log_period=1000"])
        trainer = Trainer(cfg)
        from cutler.data.build import build_train_loader
        from cutler.engine.trainer import move_to_device

        data = iter(build_train_loader(cfg, seed=0))
        trainer.model.train()
        for i in range(2):  # warm-up
            trainer.run_step(move_to_device(next(data)["inputs"], trainer.device), i)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(iters):
            trainer.run_step(move_to_device(next(data)["inputs"], trainer.device), i + 2)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return {"device": str(trainer.device), "iters": iters, "ims_per_batch": int(cfg.solver.ims_per_batch),
                "seconds": round(dt, 3), "it_per_s": round(iters / dt, 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="datasets root holding synthetic/ (default: a temporary one)")
    p.add_argument("--num-images", type=int, default=48)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--ims-per-batch", type=int, default=4)
    p.add_argument("--min-sizes", type=int, nargs="+", default=[240, 320, 480, 640, 672, 704, 736, 768, 800, 1024])
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--train-iters", type=int, default=5, help="0 skips the training benchmark")
    p.add_argument("--config-file", default="tiny/synthetic_cascade.yaml")
    p.add_argument("--train-ims-per-batch", type=int, default=0,
                   help="images per training step (0: the config's; the published recipe is 2 per GPU, 16 over 8)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads of the main process (0: torch's default)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from cutler.data.synthetic import ensure_synthetic_dataset

    tmp = None
    root = args.root
    if root is None:
        tmp = tempfile.TemporaryDirectory()
        root = tmp.name
    ensure_synthetic_dataset(root, num_train=args.num_images, num_val=4, seed=0)
    overrides = [f"datasets.root={root}", "datasets.train=[synthetic_train]", "model.roi_heads.num_classes=1",
                 f"solver.ims_per_batch={args.ims_per_batch}", f"input.min_size_train=[{','.join(map(str, args.min_sizes))}]",
                 f"input.max_size_train={args.max_size}", "dataloader.copy_paste_rate=1.0",
                 "dataloader.copy_paste_min_ratio=0.3", "seed=0"]
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                         f"torch {torch.__version__}, {torch.get_num_threads()} main-process threads, CUDA {'yes' if torch.cuda.is_available() else 'no'}",
              "command": "python scripts/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "loader": []}
    for w in args.workers:
        for cp in (False, True):
            r = bench_loader(overrides, w, cp, args.batches)
            report["loader"].append(r)
            print(json.dumps(r), flush=True)
    if args.train_iters > 0:
        # the recipe's model and solver on the synthetic images (a published config names ImageNet)
        tr = [f"datasets.root={root}", "datasets.train=[synthetic_train]", "datasets.test=[synthetic_val]"]
        if args.train_ims_per_batch > 0:
            tr.append(f"solver.ims_per_batch={args.train_ims_per_batch}")
        report["train"] = bench_train(args.config_file, tr, args.train_iters)
        print(json.dumps(report["train"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return report


if __name__ == "__main__":
    main()
