"""Command lines of U2Seg's tools (``tools/u2seg_embed.py``, ``tools/u2seg_cluster.py``, ``tools/eval_u2seg.py``).

Every tool takes ``--config-file`` (ours or a name under ``configs/``) and trailing ``u2seg.key=value``
overrides, like the other tools; see ``docs/u2seg.md`` for the commands of a whole run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from cutler.config import add_config_arguments, config_from_args
from cutler.utils.logging import setup_logger


def embed_main(argv: Optional[Sequence[str]] = None) -> dict:
    """Instance embeddings of a COCO file (or results list), sharded over torchrun ranks, resumable."""
    p = argparse.ArgumentParser(
        prog="u2seg_embed.py",
        description="DINO embeddings of every instance of a COCO instances file (MaskCut output, a label file) or "
                    "of a detection-results list, streamed to --out-dir in resumable chunks. Under torchrun each "
                    "rank takes its share of the images (or set u2seg.shard_index / u2seg.num_shards). Settings: "
                    "u2seg.feature (cls | keys), u2seg.vit_arch, patch_size, pretrain_path, crop_size, batch_size.")
    p.add_argument("--instances", required=True, help="COCO instances JSON, or a JSON list of detection results")
    p.add_argument("--images-json", default=None, help="with a results list: the COCO file of its images")
    p.add_argument("--image-root", required=True, help="folder the image file names are relative to")
    p.add_argument("--out-dir", required=True, help="embeddings folder (chunks, then features.npy)")
    add_config_arguments(p)
    args = p.parse_args(argv)
    from cutler.maskcut.dataset import resolve_shard

    from .embeddings import embed_instances, load_instance_set

    cfg = config_from_args(args).u2seg
    setup_logger(args.out_dir)
    index, count = resolve_shard(int(cfg.shard_index), int(cfg.num_shards))
    instances = load_instance_set(args.instances, args.images_json, float(cfg.min_score), cfg.feature == "keys")
    print(f"{len(instances.images)} images, {instances.num_instances} instances; shard {index}/{count}")
    summary = embed_instances(instances, args.image_root, args.out_dir, cfg, index, count)
    print(json.dumps(summary, indent=1))
    if not summary["complete"]:
        print("other shards are still running: the last one to finish writes features.npy")
    return summary


def cluster_main(argv: Optional[Sequence[str]] = None) -> dict:
    """K-means of consolidated embeddings (or assignment to saved centroids) and the cluster-labelled file."""
    p = argparse.ArgumentParser(
        prog="u2seg_cluster.py",
        description="K-means of the embeddings into u2seg.num_clusters clusters (u2seg.backend: torch | faiss | "
                    "sklearn | auto, u2seg.seed, u2seg.max_iter), saved under --out-dir, and --output: the "
                    "embedded file with every instance's cluster id (1..C) as its category. With --centroids, the "
                    "instances are assigned to the nearest saved centroid instead (a later round's predictions, "
                    "or CutLER+: a class-agnostic detector's predictions clustered offline).")
    p.add_argument("--embeddings", required=True, help="embeddings folder (tools/u2seg_embed.py --out-dir)")
    p.add_argument("--instances", required=True, help="the file that was embedded")
    p.add_argument("--images-json", default=None, help="with a results list: the COCO file of its images")
    p.add_argument("--output", required=True, help="cluster-labelled COCO file (or results list)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--out-dir", help="fit K-means; centroids, labels and clustering.json go here")
    group.add_argument("--centroids", help="assign to the centroids of this clustering folder instead")
    add_config_arguments(p)
    args = p.parse_args(argv)
    from cutler.utils.device import resolve_device

    from .kmeans import load_centroids
    from .labels import assign_embeddings, cluster_embeddings, write_cluster_labels

    cfg = config_from_args(args).u2seg
    setup_logger(args.out_dir)
    device = str(resolve_device(cfg.device))
    if args.centroids:
        ann_ids, labels = assign_embeddings(args.embeddings, args.centroids, device)
        num_clusters = len(load_centroids(args.centroids)[0])
        info = {"assigned_to": args.centroids}
    else:
        from .embeddings import load_embeddings

        result = cluster_embeddings(args.embeddings, args.out_dir, cfg, device, progress=True)
        ann_ids, labels, num_clusters = load_embeddings(args.embeddings)[0], result.labels, int(cfg.num_clusters)
        info = {"backend": result.backend, "iterations": result.iterations, "inertia": result.inertia,
                "empty_clusters": int((result.cluster_sizes() == 0).sum())}
    stats = write_cluster_labels(args.instances, ann_ids, labels, num_clusters, args.output, args.images_json,
                                 float(cfg.min_score))
    out = {**info, **stats, "num_clusters": num_clusters, "output": str(Path(args.output).resolve())}
    print(json.dumps(out, indent=1))
    return out


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    """Matched (and class-agnostic) zero-shot evaluation with the published rows beside ours."""
    p = argparse.ArgumentParser(
        prog="eval_u2seg.py",
        description="U2Seg's evaluation: class-aware inference, many-to-one matching of cluster ids to the dataset's "
                    "categories (u2seg.match_conf / match_iou / match_iou_type; negative = the published values for "
                    "the benchmark and u2seg.num_clusters), per-category COCO AP/AR, the class-agnostic metrics, "
                    "and the published CutLER+ / U2Seg rows (COCO val2017, VOC2012 val, UVO val). With --results, "
                    "existing detections (category_id = cluster id) are evaluated on --datasets instead.")
    p.add_argument("--weights", default=None, help="detector weights (default: model.weights)")
    p.add_argument("--datasets", nargs="+", default=None,
                   help="COCO, VOC, UVO (or their catalog names, or any catalog dataset with categories)")
    p.add_argument("--results", default=None, help="a results JSON to evaluate (no model): needs one --datasets")
    p.add_argument("--output", default=None, help="report folder (default: <output_dir>/u2seg_eval)")
    add_config_arguments(p, default_config="u2seg/imagenet_cascade_800")
    args = p.parse_args(argv)
    from cutler.evaluation.evaluator import build_eval_model, resolve_available
    from cutler.engine.launch import init_distributed_from_env
    from cutler.utils.logging import get_rank

    from .evaluation import benchmark_label, evaluate_results, match_params, run_u2seg_eval, u2seg_table

    cfg = config_from_args(args)
    setup_logger(args.output)
    if args.results:
        if not args.datasets or len(args.datasets) != 1:
            p.error("--results needs exactly one --datasets catalog name")
        name = args.datasets[0]
        ds = resolve_available(name, cfg.datasets.root)
        label = benchmark_label(name)
        iou, conf = match_params(cfg, label, int(cfg.u2seg.num_clusters))
        out = Path(args.output or Path(cfg.output_dir) / "u2seg_eval") / name
        metrics = evaluate_results(ds.json_file, args.results, out, conf, iou, cfg.u2seg.match_iou_type,
                                   ("bbox", "segm") if ds.has_masks else ("bbox",), int(cfg.eval.max_dets), name)
        from cutler.evaluation.report import text_table

        print(text_table(*u2seg_table({label or name: metrics}, int(cfg.u2seg.num_clusters))))
        return 0
    init_distributed_from_env()
    printer = print if get_rank() == 0 else (lambda *a, **k: None)
    model = build_eval_model(cfg, args.weights)
    run_u2seg_eval(model, cfg, datasets=args.datasets, output_dir=args.output, printer=printer)
    return 0
