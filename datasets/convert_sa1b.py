#!/usr/bin/env python
"""SA-1B per-image JSONs (sa_*.json beside sa_*.jpg, RLE masks) -> one class-agnostic COCO JSON.

    python datasets/convert_sa1b.py --input sa1b/images --num-images 1000 \
        --exclude-list train_images.txt --output sa1b/annotations/sa1b_val_cls_agnostic.json
"""
import argparse

import _cli  # noqa: F401  (puts the repository on sys.path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder with the sa_*.json files (searched recursively)")
    p.add_argument("--image-root", default=None,
                   help="folder the written file names are relative to (default: the JSON's folder)")
    p.add_argument("--num-images", type=int, default=0, help="random subset of this many images (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude-list", default=None, help="text file of image names not to take (training images)")
    p.add_argument("--output", required=True, help="output JSON")
    args = p.parse_args(argv)
    from cutler.unsam.sa1b import convert_sa1b, list_sa1b_files

    exclude = open(args.exclude_list).read().split() if args.exclude_list else ()
    _cli.finish(convert_sa1b(list_sa1b_files(args.input), args.image_root, args.num_images, args.seed, exclude),
                args.output)


if __name__ == "__main__":
    main()
