"""Command lines of MaskCut (``maskcut/maskcut.py``, ``maskcut/merge_jsons.py``): parsing only; the work
is done by :mod:`cutler.maskcut.pipeline` and :mod:`cutler.maskcut.writer`."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence

from ..config import add_config_arguments, config_from_args
from ..utils.logging import get_logger, setup_logger
from ..utils.seed import seed_everything

logger = get_logger(__name__)

# published flag -> maskcut.* key
_FLAG_KEYS = {
    "dataset_path": "dataset_path", "out_dir": "out_dir", "vit_arch": "vit_arch", "vit_feat": "vit_feat",
    "patch_size": "patch_size", "tau": "tau", "fixed_size": "fixed_size", "pretrain_path": "pretrain_path",
    "N": "n", "num_folder_per_job": "num_folder_per_job", "job_index": "job_index", "batch_size": "batch_size",
    "num_workers": "num_workers", "shard_index": "shard_index", "num_shards": "num_shards",
    "image_root": "image_root", "crf": "crf", "solver": "solver", "chunk_size": "chunk_size",
    "crf_workers": "crf_workers", "threads": "torch_threads", "compat": "compat", "output_format": "output_format",
}

# the out-of-the-box demo (no dataset, random weights) must finish in well under a minute on a CPU
DEMO_OVERRIDES = {"vit_arch": "small", "patch_size": 16, "fixed_size": 224}


def build_parser() -> argparse.ArgumentParser:
    """The MaskCut argument parser: the published flags, ours, ``--config-file`` and ``key=value``."""
    p = argparse.ArgumentParser(
        prog="maskcut.py", description="MaskCut pseudo-masks (COCO JSON) for a folder of images or a COCO image list. "
        "Without --dataset-path: a demo on the embedded synthetic dataset with random ViT-S/16 weights at 224 px.")
    p.add_argument("--dataset-path", help="image folder (any tree) or COCO JSON listing images")
    p.add_argument("--image-root", help="folder the COCO JSON's file names are relative to (default: its folder)")
    p.add_argument("--out-dir", help="output folder (default output/maskcut)")
    p.add_argument("--vit-arch", choices=["small", "base"])
    p.add_argument("--vit-feat", choices=["k", "q", "v", "kqv"])
    p.add_argument("--patch-size", type=int, choices=[8, 16])
    p.add_argument("--tau", type=float, help="affinity threshold (default 0.15)")
    p.add_argument("--fixed_size", "--fixed-size", dest="fixed_size", type=int, help="square resize (default 480)")
    p.add_argument("--pretrain_path", "--pretrain-path", dest="pretrain_path", help="DINO checkpoint file")
    p.add_argument("--N", type=int, help="masks (NCut stages) per image (default 3)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU")
    p.add_argument("--num-folder-per-job", type=int, help="published job split: top-level folders per job")
    p.add_argument("--job-index", type=int, help="published job split: which job")
    p.add_argument("--batch-size", type=int, help="images per ViT/NCut batch")
    p.add_argument("--num-workers", type=int, help="image decoding workers")
    p.add_argument("--shard-index", type=int, help="this shard (default: torchrun RANK or 0)")
    p.add_argument("--num-shards", type=int, help="shard count (default: torchrun WORLD_SIZE or 1)")
    p.add_argument("--crf", choices=["pydensecrf", "torch", "none", "auto"])
    p.add_argument("--crf-workers", type=int, help="CRF processes (0 = CPU count, -1 = inline)")
    p.add_argument("--solver", choices=["fast", "exact", "dense"])
    p.add_argument("--compat", choices=["default", "published"],
                   help="published: reproduce the published script's masks op for op (slow dense path; docs/deviations.md)")
    p.add_argument("--output-format", choices=["default", "published"],
                   help="published: merged JSON annotations also carry width/height and an integer area")
    p.add_argument("--chunk-size", type=int, help="images per output chunk")
    p.add_argument("--threads", type=int, help="torch intra-op threads in the main process (0 = default)")
    p.add_argument("--no-merge", action="store_true", help="do not merge the shards into one JSON at the end")
    p.add_argument("--output-json", help="merged JSON path (default out_dir/<dataset>_fixsize<S>_tau<T>_N<N>.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_arguments(p)
    return p


def args_to_overrides(args: argparse.Namespace) -> List[str]:
    """``maskcut.key=value`` overrides for the flags given on the command line (``None`` = not given)."""
    out = []
    for flag, key in _FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"maskcut.{key}={json.dumps(value) if isinstance(value, str) else value}")
    if args.cpu:
        out.append("maskcut.device=cpu")
    return out


def resolve_maskcut_config(argv: Sequence[str]):
    """The :class:`cutler.config.MaskCutConfig` a MaskCut command line resolves to (flags, ``--config-file``,
    overrides), e.g. for a launcher that merges the shards itself."""
    args = build_parser().parse_args(list(argv))
    return config_from_args(args, args_to_overrides(args)).maskcut


def _synthetic_dataset() -> str:
    from ..data.synthetic import ensure_synthetic_dataset

    return str(ensure_synthetic_dataset()["val"].image_root)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run MaskCut for one shard (and merge when it is the only one). Returns the shard summary."""
    from .dataset import list_dataset, resolve_shard, select_job_folders, shard_records
    from .pipeline import run_maskcut
    from .writer import OUTPUT_FORMATS, merge_outputs

    args = build_parser().parse_args(argv)
    overrides = args_to_overrides(args)
    demo = not args.dataset_path and not any(o.startswith("maskcut.dataset_path=") for o in args.overrides)
    if demo:
        given = {o.split("=")[0] for o in overrides + list(args.overrides)}
        overrides = [f"maskcut.{k}={v}" for k, v in DEMO_OVERRIDES.items() if f"maskcut.{k}" not in given] + overrides
    root_cfg = config_from_args(args, overrides)
    cfg = root_cfg.maskcut
    if cfg.output_format not in OUTPUT_FORMATS:  # checked before the run, not at the merge after it
        raise ValueError(f"unknown maskcut.output_format '{cfg.output_format}', expected one of {OUTPUT_FORMATS}")
    # random-init weights (demos, tests) must be the same in every shard and rerun: seed 0 unless told
    seed_everything(root_cfg.seed if root_cfg.seed >= 0 else 0)
    dataset_path = cfg.dataset_path
    if demo and not dataset_path:
        dataset_path = _synthetic_dataset()
        logger.info("demo mode: synthetic images in %s, ViT-%s/%d at %d px", dataset_path, cfg.vit_arch[0].upper(),
                    cfg.patch_size, cfg.fixed_size)
    setup_logger(cfg.out_dir)
    if cfg.torch_threads > 0:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    records, root = list_dataset(dataset_path, cfg.image_root or None)
    job = None
    if cfg.num_folder_per_job > 0:
        records = select_job_folders(records, cfg.num_folder_per_job, cfg.job_index)
        job = cfg.job_index
    shard, nshards = resolve_shard(cfg.shard_index, cfg.num_shards)
    mine = shard_records(records, shard, nshards)
    logger.info("dataset %s: %d images, shard %d/%d has %d", root, len(records), shard, nshards, len(mine))
    summary = run_maskcut(cfg, mine, cfg.out_dir, shard, nshards, job, progress=not args.no_progress)
    logger.info("shard %d/%d: %d processed, %d skipped (done before), %d failed %s, %d masks, %.2f img/s",
                shard, nshards, summary["processed"], summary["skipped_already_done"], summary["failed"],
                summary["failures_by_reason"], summary["annotations"], summary["img_per_s"])
    if nshards == 1 and job is None and not args.no_merge:
        if demo and not cfg.dataset_path:
            name = "synthetic_val"
        elif os.path.isdir(dataset_path):
            name = os.path.basename(os.path.normpath(root))
        else:
            name = os.path.splitext(os.path.basename(dataset_path))[0]
        out_json = args.output_json or os.path.join(
            cfg.out_dir, f"{name}_fixsize{cfg.fixed_size}_tau{cfg.tau}_N{cfg.n}.json")
        summary["merge"] = merge_outputs(cfg.out_dir, out_json, output_format=cfg.output_format)
        summary["output_json"] = out_json
        logger.info("wrote %s", out_json)
    elif nshards > 1 or job is not None:
        logger.info("merge the shards with: python maskcut/merge_jsons.py --out-dir %s", cfg.out_dir)
    return summary


def merge_main(argv: Optional[Sequence[str]] = None) -> dict:
    """``merge_jsons.py``: merge every shard under ``--out-dir`` into one COCO JSON."""
    from .writer import merge_outputs

    p = argparse.ArgumentParser(prog="merge_jsons.py", description="Merge MaskCut shard chunks into one COCO JSON")
    p.add_argument("--out-dir", required=True, help="the MaskCut out_dir holding shards/")
    p.add_argument("--save-path", "--output-json", dest="save_path", help="merged JSON (default out_dir/merged.json)")
    p.add_argument("--output-format", choices=["default", "published"], default="default",
                   help="published: annotations also carry width/height and an integer area")
    args = p.parse_args(argv)
    setup_logger()
    counts = merge_outputs(args.out_dir, args.save_path or os.path.join(args.out_dir, "merged.json"),
                           output_format=args.output_format)
    print(json.dumps(counts), file=sys.stdout)
    return counts
