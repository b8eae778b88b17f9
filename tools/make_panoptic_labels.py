#!/usr/bin/env python
"""Panoptic pseudo-labels: clustered instances (things) merged with STEGO stuff labels, per pixel things first,
then stuff, else void. Writes COCO panoptic PNG/JSON, Panoptic FPN semantic targets and the instances.json the
universal model trains on.

Example:
    python tools/make_panoptic_labels.py --instances output/u2seg/labels/clusters_800.json \\
        --stuff-dir output/stego/labels --output output/u2seg/panoptic_labels --num-things 800 --num-stuff 27
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", required=True, help="COCO instances whose category ids are thing clusters 1..C")
    p.add_argument("--stuff-dir", required=True, help="stuff label PNGs <image stem>.png (0 = none, 1..S)")
    p.add_argument("--output", required=True)
    p.add_argument("--num-things", type=int, required=True, help="C")
    p.add_argument("--num-stuff", type=int, required=True, help="S")
    p.add_argument("--max-stuff-thing-overlap", type=float, default=1.0,
                   help="void a stuff cluster whose pixels lie more than this fraction under things (published 0.7)")
    p.add_argument("--shard-index", type=int, default=-1)
    p.add_argument("--num-shards", type=int, default=-1)
    args = p.parse_args(argv)

    from cutler.maskcut.dataset import resolve_shard
    from cutler.u2seg.panoptic import make_panoptic_labels
    from cutler.utils.logging import setup_logger

    setup_logger()
    index, count = resolve_shard(args.shard_index, args.num_shards)
    print(json.dumps(make_panoptic_labels(args.instances, args.stuff_dir, args.output, args.num_things, args.num_stuff,
                                          args.max_stuff_thing_overlap, index, count)))


if __name__ == "__main__":
    main()
