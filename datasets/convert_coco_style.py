#!/usr/bin/env python
"""COCO-format JSON with categories (Objects365 v2, LVIS v1, UVO, COCO, COCO20K) -> class-agnostic COCO JSON,
or with --keep-classes the same categories (less --drop-categories) for class-aware evaluation."""
import argparse

import _cli  # noqa: F401  (puts the repository on sys.path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", required=True, help="source COCO-format JSON")
    p.add_argument("--file-names", choices=["keep", "basename", "coco_url"], default="keep",
                   help="coco_url for LVIS (val2017/<name>.jpg), basename for a flattened image folder")
    p.add_argument("--image-list", default=None, help="text file of image names to keep (COCO20K)")
    p.add_argument("--drop-empty-images", action="store_true")
    p.add_argument("--keep-classes", action="store_true", help="keep the categories (U2Seg's matched evaluation)")
    p.add_argument("--drop-categories", nargs="*", default=[], metavar="NAME",
                   help="with --keep-classes: categories to remove with their annotations (UVO: other)")
    p.add_argument("--output", required=True, help="output JSON")
    args = p.parse_args(argv)
    from cutler.evaluation.converters import convert_coco_style

    names = open(args.image_list).read().split() if args.image_list else None
    _cli.finish(convert_coco_style(args.input, args.file_names, names, args.drop_empty_images, args.keep_classes,
                                   args.drop_categories), args.output)


if __name__ == "__main__":
    main()
