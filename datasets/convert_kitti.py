#!/usr/bin/env python
"""KITTI object label files -> class-agnostic COCO JSON (see datasets/README.md)."""
import argparse

import _cli  # noqa: F401  (puts the repository on sys.path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--labels", required=True, help="training/label_2")
    p.add_argument("--images", required=True, help="training/image_2")
    p.add_argument("--image-ext", default=".png")
    p.add_argument("--dontcare", choices=["keep", "ignore", "drop"], default="ignore")
    p.add_argument("--output", required=True, help="output JSON")
    args = p.parse_args(argv)
    from cutler.evaluation.converters import convert_kitti

    _cli.finish(convert_kitti(args.labels, args.images, args.image_ext, args.dontcare), args.output)


if __name__ == "__main__":
    main()
