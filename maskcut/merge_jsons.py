#!/usr/bin/env python
"""Merge MaskCut shard chunks into one COCO JSON with unique ids (wrapper over :mod:`cutler.maskcut.cli`)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cutler.maskcut.cli import merge_main  # noqa: E402

if __name__ == "__main__":
    merge_main()
