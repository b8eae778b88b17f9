#!/usr/bin/env python
"""Draw a detector's masks, boxes and scores over images.

Example:
    python tools/demo.py --input imgs/*.jpg photos/ --weights cutler_cascade_final.pth --output demo_out
    python tools/demo.py --input img.jpg --output out --config-file tiny/synthetic_cascade   # random init
    python tools/demo.py --input imgs/ --config-file u2seg/panoptic_r50_800 --weights u2seg.pth --output out \
        --names out/pq/metrics.json      # panoptic: stuff coloured, things named by the matched categories

Without --weights (and no model.weights in the config) the model is randomly initialised, with a loud
warning: a smoke test of the pipeline, not a result.

UnSAM hierarchies (one panel per level: divide masks, then the parts at each merging threshold):
    python tools/demo.py --hierarchy --input img.jpg --output out --weights cutler_cascade_final.pth \
        --dino dino_vitbase8_pretrain.pth                       # divide-and-conquer on the spot
    python tools/demo.py --hierarchy-json pseudo.json --input images/ --output out   # masks already made
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cutler.config import add_config_arguments, config_from_args  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="image files, folders or glob patterns")
    parser.add_argument("--weights", default=None, help="model weights (.pth/.pkl); default model.weights")
    parser.add_argument("--output", required=True, help="folder for the overlay PNGs")
    parser.add_argument("--confidence", type=float, default=0.5, help="minimum score drawn")
    parser.add_argument("--names", default=None,
                        help="panoptic models: a JSON with 'thing_mapping' (cluster -> category, as "
                             "tools/eval_panoptic.py writes) and/or 'thing_names' / 'stuff_names' (id -> text)")
    parser.add_argument("--hierarchy", action="store_true",
                        help="draw the UnSAM hierarchy found by divide-and-conquer (config: unsam/divide_conquer; "
                             "--weights is the divide detector)")
    parser.add_argument("--dino", default=None, help="with --hierarchy: DINO checkpoint (unsam.conquer.pretrain_path)")
    parser.add_argument("--hierarchy-json", default=None, help="draw the hierarchy stored in this pseudo-mask JSON")
    add_config_arguments(parser, default_config=None)  # by mode: cutler/imagenet_cascade_demo or unsam/divide_conquer
    args = parser.parse_args(argv)
    if args.hierarchy or args.hierarchy_json:
        from cutler.unsam.cli import hierarchy_demo

        written = hierarchy_demo(args)
        print(f"wrote {len(written)} hierarchy pictures to {args.output}")
        return
    args.config_file = args.config_file or "cutler/imagenet_cascade_demo"

    from cutler.evaluation.demo import run_demo
    from cutler.evaluation.evaluator import build_eval_model
    from cutler.utils.logging import setup_logger

    setup_logger()
    cfg = config_from_args(args)
    model = build_eval_model(cfg, args.weights)
    thing_names, stuff_names = _names(args.names)
    written = run_demo(model, args.input, args.output, cfg.input.min_size_test, cfg.input.max_size_test,
                       args.confidence, thing_names, stuff_names)
    print(f"wrote {len(written)} overlays to {args.output}")


def _names(path):
    """(thing names, stuff names) by category id from ``--names`` (cluster ids shown as "cluster -> category")."""
    if not path:
        return None, None
    import json

    data = json.loads(Path(path).read_text())
    things = {int(k): str(v) for k, v in data.get("thing_names", {}).items()}
    for cluster, cat in data.get("thing_mapping", {}).items():
        things.setdefault(int(cluster), f"{cluster}->{cat}")
    stuff = {int(k): str(v) for k, v in data.get("stuff_names", {}).items()}
    return things, stuff


if __name__ == "__main__":
    main()
