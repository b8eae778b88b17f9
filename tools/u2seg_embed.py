#!/usr/bin/env python
"""U2Seg: DINO embeddings of every instance of a COCO file, for the clustering (see docs/u2seg.md).

Example:
    python tools/u2seg_embed.py --instances datasets/imagenet/annotations/imagenet_train_fixsize480_tau0.15_N3.json \
        --image-root datasets/imagenet/train --out-dir output/u2seg/embeddings u2seg.pretrain_path=dino_vitbase8.pth
    torchrun --nproc-per-node 8 tools/u2seg_embed.py ...     # one share of the images per rank
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cutler.u2seg.cli import embed_main  # noqa: E402

if __name__ == "__main__":
    embed_main()
