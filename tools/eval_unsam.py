#!/usr/bin/env python
"""UnSAM evaluation: mask AR with up to 1000 detections (AR small/medium/large) next to the published rows.

Examples::

    python tools/eval_unsam.py --weights unsam_r1.pth                       # COCO, LVIS, SA-1B (those on disk)
    python tools/eval_unsam.py --weights w.pth --datasets COCO sa1b_val
    python tools/eval_unsam.py --pseudo out/unsam/images_unsam.json --datasets sa1b_val   # pseudo-masks alone
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cutler.unsam.cli import eval_main  # noqa: E402

if __name__ == "__main__":
    eval_main()
