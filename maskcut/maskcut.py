#!/usr/bin/env python
"""MaskCut pseudo-masks for a dataset (thin wrapper over :mod:`cutler.maskcut.cli`).

Examples::

    python maskcut/maskcut.py                                   # demo: synthetic images, random weights
    python maskcut/maskcut.py --dataset-path imagenet/train --pretrain_path dino_vitbase8_pretrain.pth \\
        --out-dir out/maskcut --batch-size 16
    torchrun --nproc-per-node 8 maskcut/maskcut.py --dataset-path ... # one shard per rank
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cutler.maskcut.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
