"""Shared bits of the converter command lines: make the repository importable, parse, write."""
from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as `python datasets/convert_x.py` from a checkout without install
    sys.path.insert(0, str(_REPO))


def finish(dataset, output):
    """Write the converted dataset and print one summary line."""
    from cutler.evaluation.converters import write_coco_json
    from cutler.utils.logging import setup_logger

    setup_logger()
    path = write_coco_json(dataset, output)
    n_crowd = sum(a.get("iscrowd", 0) for a in dataset["annotations"])
    print(f"{path}: {len(dataset['images'])} images, {len(dataset['annotations'])} annotations "
          f"({n_crowd} crowd/ignore), {len(dataset['categories'])} categor{'y' if len(dataset['categories']) == 1 else 'ies'}")
