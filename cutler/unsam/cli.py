"""Command lines of UnSAM (``tools/unsam_divide_conquer.py``, ``tools/eval_unsam.py``): parsing only; the work
is in :mod:`cutler.unsam.divide_conquer` and :mod:`cutler.unsam.evaluation`."""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

from ..config import add_config_arguments, config_from_args
from ..utils.logging import get_logger, setup_logger
from ..utils.seed import seed_everything

logger = get_logger(__name__)


def divide_conquer_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unsam_divide_conquer.py",
        description="UnSAM hierarchical pseudo-masks (COCO JSON with level and parent per mask) for a folder of "
                    "images or a COCO image list: a trained detector divides, DINO keys and bottom-up merging "
                    "conquer each mask, mask NMS and a dense CRF merge. Sharded over torchrun ranks, resumable.")
    p.add_argument("--dataset-path", help="image folder (any tree) or COCO JSON listing images (unsam.dataset_path)")
    p.add_argument("--weights", help="the divide detector's weights (unsam.divide.weights)")
    p.add_argument("--pretrain-path", help="DINO ViT checkpoint (unsam.conquer.pretrain_path)")
    p.add_argument("--out-dir", help="output folder (unsam.out_dir)")
    p.add_argument("--no-merge", action="store_true", help="do not merge the shards into one JSON at the end")
    p.add_argument("--output-json", help="merged JSON (default out_dir/<dataset>_unsam.json)")
    p.add_argument("--no-progress", action="store_true")
    add_config_arguments(p, default_config="unsam/divide_conquer.yaml")
    return p


def divide_conquer_main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run divide-and-conquer for one shard (and merge when it is the only one). Returns the shard summary."""
    from ..maskcut.dataset import list_dataset, resolve_shard, shard_records
    from ..maskcut.writer import merge_outputs
    from .divide_conquer import run_divide_conquer

    args = divide_conquer_parser().parse_args(argv)
    flags = {"dataset_path": args.dataset_path, "divide.weights": args.weights,
             "conquer.pretrain_path": args.pretrain_path, "out_dir": args.out_dir}
    overrides = [f"unsam.{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    root_cfg = config_from_args(args, overrides)
    cfg = root_cfg.unsam
    if not cfg.dataset_path:
        raise SystemExit("give the images: --dataset-path FOLDER_OR_COCO_JSON (or unsam.dataset_path=...)")
    seed_everything(root_cfg.seed if root_cfg.seed >= 0 else 0)  # random-init weights alike in every shard
    setup_logger(cfg.out_dir)
    records, root = list_dataset(cfg.dataset_path, cfg.image_root or None)
    shard, nshards = resolve_shard(cfg.shard_index, cfg.num_shards)
    mine = shard_records(records, shard, nshards)
    logger.info("dataset %s: %d images, shard %d/%d has %d", root, len(records), shard, nshards, len(mine))
    summary = run_divide_conquer(cfg, mine, cfg.out_dir, shard, nshards, progress=not args.no_progress)
    logger.info("shard %d/%d: %d processed, %d skipped (done before), %d failed %s, %d masks, %.2f img/s",
                shard, nshards, summary["processed"], summary["skipped_already_done"], summary["failed"],
                summary["failures_by_reason"], summary["annotations"], summary["img_per_s"])
    if nshards == 1 and not args.no_merge:
        name = os.path.basename(os.path.normpath(root)) if os.path.isdir(cfg.dataset_path) else \
            os.path.splitext(os.path.basename(cfg.dataset_path))[0]
        out_json = args.output_json or os.path.join(cfg.out_dir, f"{name}_unsam.json")
        summary["merge"] = merge_outputs(cfg.out_dir, out_json, info={"description": "UnSAM pseudo-masks (cutler)"})
        summary["output_json"] = out_json
        logger.info("wrote %s", out_json)
    else:
        logger.info("merge the shards with: python maskcut/merge_jsons.py --out-dir %s", cfg.out_dir)
    return summary


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eval_unsam.py",
        description="Class-agnostic mask AR (up to unsam.max_dets detections; AR small/medium/large) of a "
                    "whole-image segmenter on COCO, LVIS and SA-1B (whichever are on disk), or of pseudo-masks "
                    "(--pseudo) against a ground truth, next to the published CutLER / SOHES / UnSAM rows.")
    p.add_argument("--weights", help="segmenter weights (default model.weights)")
    p.add_argument("--datasets", nargs="*", default=None,
                   help="benchmark labels (COCO LVIS SA-1B) or catalog names; default all three")
    p.add_argument("--pseudo", help="evaluate this pseudo-mask COCO JSON instead of a model")
    p.add_argument("--gt", help="with --pseudo: ground-truth COCO JSON (default: the catalog JSON of --datasets[0])")
    p.add_argument("--root", help="datasets root (default datasets.root)")
    p.add_argument("--output", help="folder for the tables (default output_dir/unsam_eval)")
    add_config_arguments(p, default_config="unsam/cascade_r50_fpn.yaml")
    return p


def eval_main(argv: Optional[Sequence[str]] = None) -> dict:
    """``tools/eval_unsam.py``: the AR tables; returns what was printed as data."""
    from ..evaluation.report import text_table, write_tables
    from .evaluation import evaluate_pseudo_masks, evaluate_segmenter, pseudo_table

    args = eval_parser().parse_args(argv)
    setup_logger()
    cfg = config_from_args(args)
    root = args.root or cfg.datasets.root
    out = args.output or os.path.join(cfg.output_dir, "unsam_eval")
    if args.pseudo:
        from ..data.catalog import get_dataset

        gt = args.gt or (str(get_dataset(args.datasets[0], root).json_file) if args.datasets else None)
        if not gt or not os.path.isfile(gt):
            raise SystemExit(f"--pseudo needs a ground truth: --gt FILE or --datasets NAME on disk (got {gt})")
        result = evaluate_pseudo_masks(args.pseudo, gt, int(cfg.unsam.max_dets))
        header, rows = pseudo_table(result["ar"], int(cfg.unsam.max_dets))
        write_tables(out, "unsam_pseudo_ar", header, rows, result, title="Pseudo-mask AR")
        print(f"Pseudo-masks {args.pseudo} against {gt} (%), ours vs published (SA-1B)\n" + text_table(header, rows))
        print("images:", result["info"])
        return result
    from ..evaluation.evaluator import build_eval_model

    model = build_eval_model(cfg, args.weights)
    return evaluate_segmenter(model, cfg, args.datasets, out, root)


def hierarchy_demo(args: argparse.Namespace) -> list:
    """``tools/demo.py --hierarchy`` / ``--hierarchy-json``: hierarchy pictures of the ``--input`` images, from
    divide-and-conquer run here (``--weights`` = the divide detector, ``--dino`` = the ViT) or from a pseudo-mask
    JSON. Returns the written paths."""
    from ..evaluation.demo import collect_inputs
    from .visualize import draw_hierarchies_from_json, run_hierarchy_demo

    setup_logger()
    if args.hierarchy_json:
        files = collect_inputs(args.input)
        folders = {str(f.parent) for f in files}
        if len(folders) != 1:
            raise SystemExit("--hierarchy-json: give images of one folder (the JSON's file names are matched by "
                             f"base name); got {sorted(folders) or 'none'}")
        return draw_hierarchies_from_json(args.hierarchy_json, folders.pop(), args.output,
                                          file_names=[f.name for f in files])
    extra = [f"unsam.divide.weights={json.dumps(args.weights)}"] if args.weights else []
    extra += [f"unsam.conquer.pretrain_path={json.dumps(args.dino)}"] if args.dino else []
    args.config_file = args.config_file or "unsam/divide_conquer"
    return run_hierarchy_demo(config_from_args(args, extra).unsam, args.input, args.output)
