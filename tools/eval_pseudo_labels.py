#!/usr/bin/env python
"""Quality of pseudo-labels (MaskCut or a self-training round): class-agnostic COCO AP/AR against ground truth.

Examples:
    python tools/eval_pseudo_labels.py --pred maskcut_coco_val2017.json --dataset coco_2017_val
    python tools/eval_pseudo_labels.py --pred labels.json --gt my_gt.json --score area --corloc

Each annotation becomes a detection. --score constant (default; every label scores --constant, so ties
keep file order), area (mask area / image area: larger first) or field (the annotation's "score").
Images are matched by file_name when both files name them (ids may differ), else by id.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", required=True, help="pseudo-label COCO annotation JSON")
    gt = p.add_mutually_exclusive_group(required=True)
    gt.add_argument("--dataset", help="catalog name of the ground truth, e.g. coco_2017_val")
    gt.add_argument("--gt", help="ground-truth COCO JSON")
    p.add_argument("--root", default=None, help="datasets root (default $CUTLER_DATASETS or ./datasets)")
    p.add_argument("--score", choices=["constant", "area", "field"], default="constant")
    p.add_argument("--constant", type=float, default=1.0)
    p.add_argument("--match", choices=["auto", "id", "file_name"], default="auto")
    p.add_argument("--allow-unmatched", action="store_true", help="drop labelled images absent from the GT")
    p.add_argument("--max-dets", type=int, default=100)
    p.add_argument("--corloc", action="store_true", help="also report CorLoc of the top label per image")
    p.add_argument("--output", default=None, help="folder for metrics_<name>.{json,md,csv}")
    args = p.parse_args(argv)

    from cutler.data.catalog import get_dataset
    from cutler.evaluation.pseudo_labels import evaluate_pseudo_labels
    from cutler.evaluation.report import text_table, write_metrics_report
    from cutler.evaluation.zero_shot import PAPER_MASKCUT_COCO

    gt_path = args.gt or get_dataset(args.dataset, args.root).json_file
    if not Path(gt_path).is_file():
        p.error(f"ground truth {gt_path} not found (see datasets/README.md)")
    out = evaluate_pseudo_labels(args.pred, gt_path, args.score, args.constant, args.match, args.allow_unmatched,
                                 max_dets=args.max_dets, with_corloc=args.corloc)
    name = f"pseudo_labels_{args.dataset or Path(gt_path).stem}"
    extra = {"pred": str(args.pred), "gt": str(gt_path), "score_mode": args.score, "info": out["info"]}
    if args.corloc:
        extra["corloc"] = out["corloc"]
    if args.output:
        print(write_metrics_report(args.output, name, out["metrics"], extra))
    else:
        from cutler.evaluation.report import metrics_rows

        print(text_table(*metrics_rows(out["metrics"])))
    print("images:", out["info"])
    if args.corloc:
        c = out["corloc"]
        print(f"CorLoc: {c['corloc']:.1f}% ({c['num_correct']}/{c['num_images']} images)")
    if args.dataset == "coco_2017_val":
        ref = PAPER_MASKCUT_COCO
        print(f"published MaskCut on COCO val2017: box AP50 {ref['box']['AP50']} AP {ref['box']['AP']}, "
              f"mask AP50 {ref['mask']['AP50']} AP {ref['mask']['AP']}")
    return out


if __name__ == "__main__":
    main()
