#!/usr/bin/env python
"""Cityscapes gtFine -> COCO panoptic (cityscapesscripts' convert2panoptic), images renumbered and pointing at
leftImg8bit/<split>/<city>/. See datasets/README.md."""
import argparse
import json

import _cli  # noqa: F401  (puts the repository on sys.path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", required=True, help="the Cityscapes folder with gtFine/ and leftImg8bit/")
    p.add_argument("--split", default="val")
    p.add_argument("--output-json", required=True)
    p.add_argument("--output-dir", required=True, help="folder for the panoptic PNGs")
    args = p.parse_args(argv)
    from cutler.u2seg.converters import convert_cityscapes_panoptic

    print(json.dumps(convert_cityscapes_panoptic(args.root, args.output_json, args.output_dir, args.split)))


if __name__ == "__main__":
    main()
