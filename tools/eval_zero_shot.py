#!/usr/bin/env python
"""Zero-shot, class-agnostic evaluation on the paper's 11 benchmarks (those on disk; the others are skipped).

Example:
    python tools/eval_zero_shot.py --weights cutler_cascade_final.pth
    python tools/eval_zero_shot.py --weights W --datasets coco_2017_val voc07_trainval \
        --config-file cutler/imagenet_cascade_demo eval.batch_size=4

With --corloc, also single-object discovery CorLoc on VOC07/VOC12 trainval and COCO20K.
Prints AP50/AR100 (box) per benchmark and their average beside the published CutLER numbers, and the
full COCO val2017 row (box and mask AP50/AP75/AP). Under torchrun every rank runs a shard.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cutler.config import add_config_arguments, config_from_args  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="model weights (.pth/.pkl); default model.weights")
    parser.add_argument("--datasets", nargs="+", default=None,
                        help="benchmark labels or catalog names (default: eval.datasets, all 11)")
    parser.add_argument("--corloc", action="store_true",
                        help="also CorLoc on eval.corloc_datasets (VOC07/VOC12 trainval, COCO20K) where on disk")
    parser.add_argument("--output", default=None, help="report folder (default: <output_dir>/zero_shot)")
    add_config_arguments(parser, default_config="cutler/imagenet_cascade_demo")
    args = parser.parse_args(argv)

    from cutler.engine.launch import init_distributed_from_env
    from cutler.evaluation.evaluator import build_eval_model
    from cutler.evaluation.zero_shot import plan_zero_shot, run_corloc, run_zero_shot
    from cutler.utils.logging import get_rank, setup_logger

    init_distributed_from_env()  # under torchrun: one GPU per rank, barrier before rank 0 merges
    cfg = config_from_args(args)
    setup_logger(args.output)
    printer = print if get_rank() == 0 else (lambda *a, **k: None)
    plan, skipped = plan_zero_shot(cfg, args.datasets)
    if not plan:  # say so before spending time on building the model
        for label, reason in skipped.items():
            printer(f"[skip] {label}: {reason}")
        printer(f"no zero-shot benchmark found under datasets.root={cfg.datasets.root}; see datasets/README.md")
        return 1
    model = build_eval_model(cfg, args.weights)
    run_zero_shot(model, cfg, datasets=args.datasets, output_dir=args.output, printer=printer)
    if args.corloc:
        run_corloc(model, cfg, output_dir=args.output, printer=printer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
