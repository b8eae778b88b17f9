#!/usr/bin/env python
"""COCO panoptic val2017 -> the U2Seg evaluation form: 80 things, stuff merged into 15 supercategories
(optionally COCO-Stuff-27 semantic maps). See datasets/README.md."""
import argparse
import json

import _cli  # noqa: F401  (puts the repository on sys.path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--panoptic-json", required=True, help="annotations/panoptic_val2017.json")
    p.add_argument("--panoptic-dir", required=True, help="annotations/panoptic_val2017/ (the PNGs)")
    p.add_argument("--output-json", required=True)
    p.add_argument("--output-dir", required=True, help="folder for the converted PNGs")
    p.add_argument("--semantic-dir", default=None, help="also write COCO-Stuff-27 semantic maps here")
    args = p.parse_args(argv)
    from cutler.u2seg.converters import convert_coco_panoptic

    print(json.dumps(convert_coco_panoptic(args.panoptic_json, args.panoptic_dir, args.output_json, args.output_dir,
                                           args.semantic_dir)))


if __name__ == "__main__":
    main()
