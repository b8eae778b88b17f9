#!/usr/bin/env python
"""Unsupervised panoptic evaluation of a U2Seg universal model: panoptic inference, cluster -> category matching
(things: many-to-one votes; stuff: Hungarian), PQ / SQ / RQ overall / things / stuff, next to the published rows.

Examples:
    python tools/eval_panoptic.py --config-file u2seg/panoptic_r50_800 --weights model_final.pth \\
        --benchmark coco --gt-json datasets/coco/panoptic/panoptic_val2017_u2seg.json \\
        --gt-dir datasets/coco/panoptic/panoptic_val2017_u2seg --image-root datasets/coco/val2017 --output out/pq
    python tools/eval_panoptic.py --config-file tiny/synthetic_panoptic --weights W --benchmark synthetic --output out

--benchmark synthetic reads the synthetic panoptic val split; coco / cityscapes need --gt-json/--gt-dir/--image-root
(see datasets/README.md for the converters). Matching thresholds default to the published COCO 800-cluster ones.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cutler.config import add_config_arguments, config_from_args  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--benchmark", choices=["coco", "cityscapes", "synthetic"], required=True)
    parser.add_argument("--gt-json")
    parser.add_argument("--gt-dir")
    parser.add_argument("--image-root")
    parser.add_argument("--semantic-dir", default=None,
                        help="ground-truth <stem>.png class maps (255 = void): also PixelAcc / mIoU of the output")
    parser.add_argument("--conf", type=float, default=0.4, help="thing matching: detections scoring at least this vote")
    parser.add_argument("--iou", type=float, default=0.6, help="thing matching: a vote needs mask IoU above this")
    parser.add_argument("--output", required=True)
    add_config_arguments(parser, default_config="u2seg/panoptic_r50_800")
    args = parser.parse_args(argv)

    from cutler.evaluation.evaluator import build_eval_model
    from cutler.u2seg.panoptic import load_panoptic_json
    from cutler.u2seg.panoptic_eval import evaluate_panoptic, panoptic_report, predict_panoptic
    from cutler.utils.io import atomic_write_json, atomic_write_text
    from cutler.utils.logging import setup_logger

    setup_logger()
    cfg = config_from_args(args)
    if args.benchmark == "synthetic":
        from cutler.data.catalog import default_datasets_root

        val = Path(cfg.datasets.root or default_datasets_root()) / "synthetic_panoptic" / "val"
        gt_json, gt_dir, image_root = val / "panoptic.json", val / "panoptic", val / "images"
    else:
        if not (args.gt_json and args.gt_dir and args.image_root):
            parser.error("--gt-json, --gt-dir and --image-root are needed for coco / cityscapes")
        gt_json, gt_dir, image_root = Path(args.gt_json), Path(args.gt_dir), Path(args.image_root)
    model = build_eval_model(cfg, args.weights)
    out = Path(args.output)
    gt = load_panoptic_json(gt_json)
    num_things = int(cfg.model.roi_heads.num_classes)
    predict_panoptic(model, gt["images"], image_root, out / "predictions", num_things,
                     int(cfg.input.min_size_test), int(cfg.input.max_size_test), int(cfg.test.detections_per_image))
    res = evaluate_panoptic(out / "predictions", gt_json, gt_dir, num_things, args.conf, args.iou)
    semantic_dir = args.semantic_dir or (str(val / "semantic") if args.benchmark == "synthetic" else None)
    if semantic_dir:
        from cutler.u2seg.panoptic_eval import semantic_from_predictions

        num_labels = num_things + int(cfg.model.sem_seg_head.num_classes) - 1
        res["semantic"] = semantic_from_predictions(out / "predictions", gt, semantic_dir, num_labels)
        print(f"semantic: PixelAcc {res['semantic']['PixelAcc']:.1f}, mIoU {res['semantic']['mIoU']:.1f}")
    atomic_write_json(out / "metrics.json", res, indent=1)
    report = panoptic_report(res, args.benchmark if args.benchmark != "synthetic" else "synthetic", "cutler (this run)")
    atomic_write_text(out / "report.md", report)
    print(report)
    print(", ".join(f"{k} {res[k]:.1f}" for k in ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")))


if __name__ == "__main__":
    main()
