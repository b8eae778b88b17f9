#!/usr/bin/env python
"""MaskCut on one image, masks drawn over it (thin wrapper over :mod:`cutler.maskcut.demo`).

    python maskcut/demo.py --img-path photo.jpg --pretrain_path dino_vitbase8_pretrain.pth --output out.png --show-eigvecs
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cutler.maskcut.demo import main  # noqa: E402

if __name__ == "__main__":
    main()
