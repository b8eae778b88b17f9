#!/usr/bin/env python
"""UnSAM divide-and-conquer pseudo-masks for a dataset (thin wrapper over :mod:`cutler.unsam.cli`).

Examples::

    python tools/unsam_divide_conquer.py --dataset-path sa1b/images --weights cutler_cascade_final.pth \\
        --pretrain-path dino_vitbase8_pretrain.pth --out-dir out/unsam
    torchrun --nproc-per-node 8 tools/unsam_divide_conquer.py --dataset-path ...   # one shard per rank
    python tools/unsam_divide_conquer.py --config-file unsam/tiny.yaml --dataset-path datasets/synthetic_parts/val/images
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cutler.unsam.cli import divide_conquer_main  # noqa: E402

if __name__ == "__main__":
    divide_conquer_main()
