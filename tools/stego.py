#!/usr/bin/env python
"""STEGO stuff labels for U2Seg: train the head (and its cluster probe), then label every image.

Examples:
    python tools/stego.py train stego.dataset_path=datasets/coco/train2017 stego.pretrain_path=dino_vitbase8.pth
    torchrun --nproc_per_node 8 tools/stego.py infer stego.dataset_path=datasets/coco/train2017 stego.pretrain_path=...
    python tools/stego.py all --config-file pipeline/u2seg_panoptic.yaml      # both steps, the config's stego section
    python tools/stego.py eval --semantic-dir datasets/coco/panoptic/semantic_val2017_cocostuff27 \
        stego.dataset_path=datasets/coco/val2017 ...   # PixelAcc / mIoU of the labels (Hungarian-matched)

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
    parser.add_argument("step", choices=["train", "infer", "all", "eval"])
    parser.add_argument("--semantic-dir", default=None, help="eval: ground-truth <stem>.png class maps (255 = void)")
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
    if args.step == "eval":
        if not args.semantic_dir:
            parser.error("eval needs --semantic-dir")
        import os

        from cutler.u2seg.panoptic import read_label_png
        from cutler.u2seg.panoptic_eval import semantic_label_metrics
        from cutler.u2seg.stego_run import label_path

        pairs = ((read_label_png(label_path(c.out_dir, r.file_name)),
                  read_label_png(Path(args.semantic_dir) / (os.path.splitext(r.file_name)[0] + ".png"))) for r in records)
        res = semantic_label_metrics(pairs, int(c.num_clusters))
        print(json.dumps({k: res[k] for k in ("PixelAcc", "mIoU", "mapping")}))


if __name__ == "__main__":
    main()
