#!/usr/bin/env python
"""U2Seg: K-means of the instance embeddings, and the COCO file with cluster ids as categories (docs/u2seg.md).

Example:
    python tools/u2seg_cluster.py --embeddings output/u2seg/embeddings --out-dir output/u2seg/clusters_800 \
        --instances datasets/imagenet/annotations/imagenet_train_fixsize480_tau0.15_N3.json \
        --output datasets/imagenet/annotations/imagenet_train_u2seg_800.json u2seg.num_clusters=800
    python tools/u2seg_cluster.py --embeddings EMB_OF_PREDICTIONS --centroids output/u2seg/clusters_800 \
        --instances predictions.json --images-json IMAGES.json --output predictions_clusters.json
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cutler.u2seg.cli import cluster_main  # noqa: E402

if __name__ == "__main__":
    cluster_main()
