#!/usr/bin/env python
"""Pascal VOC / Clipart / Watercolor / Comic XML -> class-agnostic COCO JSON, or with --keep-classes the 20 VOC
classes as categories (see datasets/README.md)."""
import argparse

import _cli  # noqa: F401  (puts the repository on sys.path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", required=True, help="folder with Annotations/, ImageSets/Main/, JPEGImages/")
    p.add_argument("--splits", nargs="+", default=["trainval"], help="image sets, e.g. trainval test")
    p.add_argument("--difficult", choices=["keep", "ignore", "drop"], default="keep")
    p.add_argument("--keep-classes", action="store_true", help="keep the object classes as categories (U2Seg)")
    p.add_argument("--output", required=True, help="output JSON")
    args = p.parse_args(argv)
    from cutler.evaluation.converters import convert_voc

    _cli.finish(convert_voc(args.root, args.splits, difficult=args.difficult, keep_classes=args.keep_classes),
                args.output)


if __name__ == "__main__":
    main()
