#!/usr/bin/env python
"""OpenImages v6 box CSV (normalised coordinates) -> class-agnostic COCO JSON in pixels (see datasets/README.md)."""
import argparse

import _cli  # noqa: F401  (puts the repository on sys.path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--csv", required=True, help="validation-annotations-bbox.csv")
    p.add_argument("--images", required=True, help="folder of <ImageID>.jpg (image sizes are read from it)")
    p.add_argument("--image-ext", default=".jpg")
    p.add_argument("--group-of", choices=["keep", "ignore", "drop"], default="ignore")
    p.add_argument("--output", required=True, help="output JSON")
    args = p.parse_args(argv)
    from cutler.evaluation.converters import convert_openimages

    _cli.finish(convert_openimages(args.csv, args.images, args.image_ext, args.group_of), args.output)


if __name__ == "__main__":
    main()
