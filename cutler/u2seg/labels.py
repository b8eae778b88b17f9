"""From embeddings to pseudo-classes: cluster, assign new instances, write COCO files whose categories are clusters.

A cluster-labelled file is an ordinary COCO instances file: categories ``1..C`` named ``"1".."C"``,
every annotation's ``category_id`` its cluster id (cluster index + 1). A list of detection results is
written back as a results list with the cluster id as ``category_id`` (what the matched evaluation reads).
Instances without an embedding (their image could not be read) are left out and counted.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from cutler.utils.io import atomic_open
from cutler.utils.logging import get_logger

from .embeddings import SETTINGS_FILE, load_embeddings
from .kmeans import KMeansResult, assign_to_centroids, load_centroids, run_kmeans, save_clustering

logger = get_logger(__name__)


def cluster_categories(num_clusters: int) -> list:
    """COCO categories ``[{"id": 1, "name": "1", ...}, ..., {"id": C, "name": "C"}]``."""
    return [{"id": c, "name": str(c), "supercategory": "cluster"} for c in range(1, int(num_clusters) + 1)]


def cluster_embeddings(embeddings_dir: os.PathLike | str, out_dir: os.PathLike | str, cfg: Any,
                       device: str = "cpu", progress: bool = False) -> KMeansResult:
    """K-means of a consolidated embeddings folder into ``cfg.num_clusters`` clusters; writes ``centroids.npy``,
    ``labels.npy`` (aligned with the embeddings' ``ann_ids.npy``) and ``clustering.json`` into ``out_dir``.

    Args:
        cfg: the ``u2seg`` config section (num_clusters, backend, seed, max_iter, max_points_per_centroid).
    """
    ann_ids, _, feats = load_embeddings(embeddings_dir)
    k = int(cfg.num_clusters)
    if k > len(feats):
        raise ValueError(f"u2seg.num_clusters={k} is more than the {len(feats)} embedded instances in "
                         f"{embeddings_dir}; choose fewer clusters")
    result = run_kmeans(feats, k, cfg.backend, int(cfg.seed), int(cfg.max_iter), device,
                        int(cfg.max_points_per_centroid), progress=progress)
    settings = json.loads((Path(embeddings_dir) / SETTINGS_FILE).read_text())
    save_clustering(out_dir, result, {"seed": int(cfg.seed), "max_iter": int(cfg.max_iter),
                                      "embeddings": str(Path(embeddings_dir).resolve()), "embedding": settings})
    return result


def assign_embeddings(embeddings_dir: os.PathLike | str, clustering: os.PathLike | str, device: str = "cpu"
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """Nearest saved centroid of every embedded instance (e.g. a later round's predictions).

    Returns:
        ``(ann_ids (N,), cluster index (N,) in [0, C))``.

    Raises:
        ValueError: the embeddings were made with other settings (feature, ViT, size) than the clustering's.
    """
    centroids, meta = load_centroids(clustering)
    ann_ids, _, feats = load_embeddings(embeddings_dir)
    settings = json.loads((Path(embeddings_dir) / SETTINGS_FILE).read_text())
    fitted = meta.get("embedding")
    if fitted is not None and {k: v for k, v in settings.items() if k != "pretrain_path"} != \
            {k: v for k, v in fitted.items() if k != "pretrain_path"}:
        raise ValueError(f"{embeddings_dir} was embedded with {settings}, the centroids of {clustering} with "
                         f"{fitted}: embed the new instances with the clustering's settings")
    labels, _ = assign_to_centroids(feats, centroids, device)
    return ann_ids, labels


def write_cluster_labels(instances: os.PathLike | str, ann_ids: np.ndarray, labels: np.ndarray, num_clusters: int,
                         out_file: os.PathLike | str, images_json: Optional[os.PathLike | str] = None,
                         min_score: float = 0.0) -> Dict[str, int]:
    """Write ``instances`` with each instance's cluster as its category (see the module docstring).

    Args:
        instances: the COCO file (or results list) that was embedded.
        ann_ids, labels: the embedded instances' ids (as :func:`~.embeddings.load_instance_set` numbered
            them) and their cluster indices in ``[0, num_clusters)``.
        images_json: with a results list, the COCO file of its images (written into the output when the
            output is a COCO file; unused otherwise).
        min_score: instances below it were not embedded (counted apart from the unreadable ones).

    Returns:
        ``{"instances": written, "without_embedding": left out (unreadable image), "below_score": ...}``.
    """
    with open(instances, encoding="utf-8") as f:
        data = json.load(f)
    order = np.argsort(ann_ids, kind="stable")
    sorted_ids, sorted_labels = np.asarray(ann_ids)[order], np.asarray(labels)[order]

    def cluster_of(ann_id: int) -> Optional[int]:
        i = int(np.searchsorted(sorted_ids, ann_id))
        return int(sorted_labels[i]) + 1 if i < len(sorted_ids) and sorted_ids[i] == ann_id else None

    is_results = isinstance(data, list)
    anns = [{**r, "id": i + 1} for i, r in enumerate(data)] if is_results else data.get("annotations", [])
    stats = {"instances": 0, "without_embedding": 0, "below_score": 0}
    out_anns = []
    for a in anns:
        if a.get("score", 1.0) < min_score:
            stats["below_score"] += 1
            continue
        cid = cluster_of(a["id"])
        if cid is None:
            stats["without_embedding"] += 1
            continue
        b = dict(a, category_id=cid)
        if is_results:
            b.pop("id")
        out_anns.append(b)
    stats["instances"] = len(out_anns)
    with atomic_open(out_file, "w", encoding="utf-8") as f:
        if is_results:
            json.dump(out_anns, f, separators=(",", ":"))
        else:
            out = {k: v for k, v in data.items() if k not in ("annotations", "categories")}
            out["info"] = {**(data.get("info") or {}), "u2seg_num_clusters": int(num_clusters)}
            out["categories"] = cluster_categories(num_clusters)
            out["annotations"] = out_anns
            json.dump(out, f, separators=(",", ":"))
    if stats["without_embedding"]:
        logger.warning("%d instances of %s have no embedding (unreadable images) and are left out of %s",
                       stats["without_embedding"], instances, out_file)
    logger.info("wrote %d cluster-labelled instances (%d clusters) -> %s", stats["instances"], num_clusters, out_file)
    return stats
