#!/usr/bin/env python
"""Build round t+1's pseudo-labels from round t's predictions and labels (see cutler/selftrain/merge.py).

Example:
    python tools/get_self_training_ann.py --new-pred output/inference/results.json \
        --prev-ann datasets/imagenet/annotations/imagenet_train_fixsize480_tau0.15_N3.json \
        --save-path datasets/imagenet/annotations/cutler_imagenet1k_train_r1.json --threshold 0.7
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cutler.selftrain.merge import merge_rounds_cli  # noqa: E402

if __name__ == "__main__":
    merge_rounds_cli()
