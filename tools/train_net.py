#!/usr/bin/env python
"""Train (or evaluate) a detector.

    python tools/train_net.py --config-file configs/cutler/imagenet_cascade_r0.yaml --num-gpus 8 [key=value ...]
    torchrun --nproc-per-node 8 tools/train_net.py --config-file ...           # same, through torchrun
    python tools/train_net.py --config-file ... --num-machines 2 --machine-rank R --dist-url tcp://HOST:PORT
    python tools/train_net.py --config-file ... --resume                      # continue OUTPUT_DIR's last checkpoint
    python tools/train_net.py --config-file ... --eval-only model.weights=W
    python tools/train_net.py                                                 # the tiny synthetic recipe on CPU

See docs/training.md.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cutler.config import add_config_arguments  # noqa: E402
from cutler.engine import launch  # noqa: E402
from cutler.engine.defaults import ensure_builtin_data, train_net_main  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine (CPU processes without CUDA)")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument("--dist-url", default="auto", help="tcp://HOST:PORT of machine 0 ('auto': a free local port)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    parser.add_argument("--eval-only", action="store_true", help="evaluate model.weights (or the last checkpoint)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from cutler.config import config_from_args

    # Synthetic data is generated once, before any process starts.
    probe = argparse.Namespace(**vars(args))
    probe.config_file = args.config_file or "tiny/synthetic_cascade.yaml"
    ensure_builtin_data(config_from_args(probe))
    result = launch(train_net_main, args.num_gpus, args.num_machines, args.machine_rank, args.dist_url, args=(args,))
    if result is not None:
        print(result)


if __name__ == "__main__":
    main()
