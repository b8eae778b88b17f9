"""U2Seg's stages of the one-command pipeline (``pipeline.variant=u2seg``).

Between MaskCut and round 0 the U2Seg variant adds:

    embed      instance embeddings of the MaskCut masks -> u2seg/embeddings/ (sharded chunks, resumable)
    cluster    K-means into u2seg.num_clusters -> u2seg/clusters/ (centroids, labels) and labels/round0.json,
               the MaskCut masks with their cluster ids as categories

and the runner then trains class-aware rounds (``model.roi_heads.num_classes`` = clusters), predicts with
cluster ids, keeps them through the self-training merge, and evaluates with many-to-one matching next to
the class-agnostic metrics. The ``u2seg`` section of the pipeline config applies to every stage (it is
passed on to the detector configs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from omegaconf import OmegaConf

from cutler.pipeline.stages import Stage


def embeddings_dir(plan) -> Path:
    return plan.run_dir / "u2seg" / "embeddings"


def clusters_dir(plan) -> Path:
    return plan.run_dir / "u2seg" / "clusters"


def detector_overrides(cfg) -> List[str]:
    """The pipeline's ``u2seg`` section as detector-config overrides, plus the class count it implies."""
    section = OmegaConf.to_container(cfg.u2seg, resolve=True)
    out = [f"u2seg.{k}={_value(v)}" for k, v in section.items()]
    return out + [f"model.roi_heads.num_classes={int(cfg.u2seg.num_clusters)}"]


def _value(v: Any) -> str:
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(v).lower() if isinstance(v, bool) else str(v)


def label_stages(plan) -> List[Stage]:
    """The ``embed`` and ``cluster`` stages of ``plan`` (a :class:`cutler.pipeline.runner.PipelinePlan`)."""
    u = plan.cfg.u2seg
    section = OmegaConf.to_container(u)
    emb, clu = embeddings_dir(plan), clusters_dir(plan)
    embed_cfg = {k: section[k] for k in ("feature", "vit_arch", "patch_size", "pretrain_path", "crop_size", "image_size")}
    cluster_cfg = {k: section[k] for k in ("num_clusters", "backend", "seed", "max_iter", "max_points_per_centroid")}
    return [
        Stage("embed", lambda: run_embed(plan), inputs={"labels": str(plan.maskcut_labels())},
              outputs={"features": str(emb / "features.npy")}, config=embed_cfg,
              description=f"instance embeddings of the pseudo-masks ({u.feature}, ViT-{u.vit_arch[0].upper()}/{u.patch_size})"),
        Stage("cluster", lambda: run_cluster(plan), inputs={"features": str(emb / "features.npy")},
              outputs={"labels": str(plan.labels(0)), "centroids": str(clu / "centroids.npy")}, config=cluster_cfg,
              description=f"K-means into {u.num_clusters} clusters; cluster ids become the categories of round 0"),
    ]


def run_embed(plan) -> Dict[str, Any]:
    from cutler.utils.seed import seed_everything

    from .embeddings import embed_instances, load_instance_set

    seed_everything(max(int(plan.cfg.seed), 0))  # random-init ViT weights are the same on every rerun
    instances = load_instance_set(plan.maskcut_labels(), with_masks=plan.cfg.u2seg.feature == "keys")
    summary = embed_instances(instances, plan.train_images, embeddings_dir(plan), plan.cfg.u2seg, 0, 1, progress=True)
    if not summary["complete"]:
        raise RuntimeError(f"embeddings in {embeddings_dir(plan)} are incomplete")
    return {k: summary[k] for k in ("images", "instances", "failed", "instances_per_s")}


def run_cluster(plan) -> Dict[str, Any]:
    from cutler.utils.device import resolve_device

    from .embeddings import load_embeddings
    from .labels import cluster_embeddings, write_cluster_labels

    u = plan.cfg.u2seg
    result = cluster_embeddings(embeddings_dir(plan), clusters_dir(plan), u, device=str(resolve_device(u.device)))
    ann_ids, _, _ = load_embeddings(embeddings_dir(plan))
    stats = write_cluster_labels(plan.maskcut_labels(), ann_ids, result.labels, int(u.num_clusters), plan.labels(0))
    sizes = result.cluster_sizes()
    return {"pseudo_masks": stats["instances"], "without_embedding": stats["without_embedding"],
            "backend": result.backend, "iterations": result.iterations, "inertia": result.inertia,
            "empty_clusters": int((sizes == 0).sum()), "largest_cluster": int(sizes.max())}
