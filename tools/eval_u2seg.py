#!/usr/bin/env python
"""U2Seg's zero-shot evaluation: cluster ids matched to categories, per-category and class-agnostic COCO metrics,
next to the published CutLER+ and U2Seg rows (COCO val2017, VOC2012 val, UVO val; those on disk).

Example:
    python tools/eval_u2seg.py --weights u2seg_800.pth --config-file u2seg/imagenet_cascade_800
    python tools/eval_u2seg.py --results predictions_clusters.json --datasets coco_2017_val u2seg.num_clusters=800
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cutler.u2seg.cli import eval_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(eval_main())
