#!/usr/bin/env python
"""STEGO stuff labels for U2Seg: train the head (and its cluster probe), then label every image.

Examples:
    python tools/stego.py train stego.dataset_path=datasets/coco/train2017 stego.pretrain_path=dino_vitbase8.pth
    torchrun --nproc_per_node 8 tools/stego.py infer stego.dataset_path=datasets/coco/train2017 stego.pretrain_path=...
    python tools/stego.py all --config-file pipeline/u2seg_panoptic.yaml      # both steps, the config's stego section

``train`` resumes from ``<out_dir>/train/checkpoint.pth``; ``infer`` shards the images over torchrun's ranks
(or ``stego.shard_index``/``stego.num_shards``) and skips images already labelled.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cutler.config import add_config_arguments, config_from_args  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["train", "infer", "all"])
    add_config_arguments(parser)
    args = parser.parse_args(argv)

    from cutler.maskcut.dataset import list_dataset, resolve_shard
    from cutler.u2seg.stego_run import infer_stego, train_stego
    from cutler.utils.logging import setup_logger

    setup_logger()
    c = config_from_args(args).stego
    if not c.dataset_path:
        parser.error("stego.dataset_path is empty: give an image folder or a COCO JSON (stego.dataset_path=...)")
    records, _ = list_dataset(c.dataset_path, c.image_root or None)
    if args.step in ("train", "all"):
        print(json.dumps(train_stego(c, records)))
    if args.step in ("infer", "all"):
        index, count = resolve_shard(c.shard_index, c.num_shards)
        print(json.dumps(infer_stego(c, records, index, count)))


if __name__ == "__main__":
    main()
