#!/usr/bin/env python
"""Check that cutler's detector gives Detectron2's detections for the same config, weights and image.

Needs a Detectron2 source build in the same environment (``import detectron2``); without it the
script stops with exit code 2 unless ``--ours-only`` is given (then it just prints our detections,
useful to check that the config and weights load).

Both models receive the SAME resized image tensor: our evaluation's input
(``cutler.evaluation.prepare_input``: Detectron2's ResizeShortestEdge size rule with
``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST`` and its PIL bilinear resampling), so any difference comes from
the models.
Reported: max |difference| of the normalised padded input and of every FPN level, the number of
detections, and for detections matched greedily by score (same class, best IoU): min box IoU, max
|box difference| in pixels, max |score difference|, min mask IoU. Exit code 0 when every tolerance
holds, 1 otherwise.

Example::

    PYTHONPATH=. python scripts/compare_with_detectron2.py \
        --config-file path/to/CutLER/cutler/model_zoo/configs/CutLER-ImageNet/cascade_mask_rcnn_R_50_FPN.yaml \
        --weights cutler_cascade_final.pth --image demo.jpg --device cpu

CutLER's ``CustomCascadeROIHeads``/``CustomStandardROIHeads`` are replaced by Detectron2's
``CascadeROIHeads``/``StandardROIHeads`` on the Detectron2 side (they differ only in training
losses), unless ``--d2-import`` names a module that registers them (e.g. CutLER's ``modeling``).
"""
from __future__ import annotations

import argparse
import importlib
import sys

import torch

from cutler.checkpoint import load_weights
from cutler.config import load_config
from cutler.evaluation.inference import prepare_input
from cutler.modeling import build_model
from cutler.structures.boxes import pairwise_iou
from cutler.structures.masks import mask_iou
from cutler.utils.image import read_image_rgb

CUSTOM_HEADS = {"CustomCascadeROIHeads": "CascadeROIHeads", "CustomStandardROIHeads": "StandardROIHeads"}


def build_d2(args):
    try:
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model as d2_build_model
        from detectron2.checkpoint import DetectionCheckpointer
    except ImportError:
        return None
    for name in args.d2_import:
        importlib.import_module(name)
    cfg = get_cfg()
    cfg.set_new_allowed(True)  # CutLER-only keys (USE_DROPLOSS, COPY_PASTE, ...) are irrelevant here
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.d2_opts)
    if not args.d2_import and cfg.MODEL.ROI_HEADS.NAME in CUSTOM_HEADS:
        cfg.MODEL.ROI_HEADS.NAME = CUSTOM_HEADS[cfg.MODEL.ROI_HEADS.NAME]
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.WEIGHTS = args.weights
    model = d2_build_model(cfg).eval()
    DetectionCheckpointer(model).load(args.weights)
    return model, cfg


def match(ours, theirs):
    """Greedy matching by descending score of same-class detections with the highest IoU."""
    iou = pairwise_iou(ours["boxes"], theirs["boxes"])
    iou[ours["classes"][:, None] != theirs["classes"][None, :]] = -1
    pairs, used = [], set()
    for i in torch.argsort(ours["scores"], descending=True).tolist():
        order = torch.argsort(iou[i], descending=True).tolist()
        j = next((j for j in order if j not in used and iou[i, j] >= 0), None)
        if j is not None:
            used.add(j)
            pairs.append((i, j))
    return pairs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config-file", required=True, help="CutLER/Detectron2 YAML (read by both)")
    ap.add_argument("--weights", required=True, help="local .pth/.pkl")
    ap.add_argument("--image", required=True, nargs="+")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--opts", nargs="*", default=[], help="our key=value overrides (e.g. model.roi_heads.score_thresh_test=0.0)")
    ap.add_argument("--d2-opts", nargs="*", default=[], help="Detectron2 KEY VALUE pairs")
    ap.add_argument("--d2-import", nargs="*", default=[], help="modules to import to register custom Detectron2 parts")
    ap.add_argument("--ours-only", action="store_true")
    ap.add_argument("--box-atol", type=float, default=1e-2, help="max |box difference| in pixels")
    ap.add_argument("--score-atol", type=float, default=1e-4)
    ap.add_argument("--mask-iou", type=float, default=0.99)
    ap.add_argument("--feature-atol", type=float, default=1e-3)
    args = ap.parse_args()

    cfg = load_config(args.config_file, [f"model.device={args.device}"] + args.opts)
    ours = build_model(cfg).eval()
    report = load_weights(ours, args.weights)
    print(f"ours: {len(report.missing_keys)} missing, {len(report.unexpected_keys)} unexpected keys")
    d2 = None if args.ours_only else build_d2(args)
    if d2 is None and not args.ours_only:
        print("detectron2 is not importable in this environment: install a Detectron2 source build, "
              "or pass --ours-only", file=sys.stderr)
        raise SystemExit(2)

    ok = True
    for path in args.image:
        # Decoded as Detectron2's read_image does (EXIF orientation applied), resized by the shared helper.
        inputs = [prepare_input(read_image_rgb(path), cfg.input.min_size_test, cfg.input.max_size_test)]
        image, height, width = inputs[0]["image"], inputs[0]["height"], inputs[0]["width"]
        with torch.no_grad():
            out = ours(inputs)[0]["instances"]
        print(f"{path}: ours {len(out['scores'])} detections, top scores {out['scores'][:5].tolist()}")
        if d2 is None:
            continue
        model, d2cfg = d2
        d2_image = image.flip(0) if d2cfg.INPUT.FORMAT == "BGR" else image
        d2_inputs = [{"image": d2_image, "height": height, "width": width}]
        with torch.no_grad():
            ref = model(d2_inputs)[0]["instances"].to("cpu")
            d2_images = model.preprocess_image(d2_inputs).tensor
            d2_feats = model.backbone(d2_images)
            our_images, _ = ours.preprocess_image(inputs)
            our_feats = ours.backbone(our_images)
        if d2cfg.INPUT.FORMAT == "BGR" and ours.input_format == "RGB":
            d2_images = d2_images.flip(1)
        diffs = {"input": (our_images.cpu() - d2_images.cpu()).abs().max().item()}
        diffs.update({k: (our_feats[k].cpu() - d2_feats[k].cpu()).abs().max().item() for k in our_feats})
        print("  max |ours - detectron2|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
        ok &= all(v <= args.feature_atol for v in diffs.values())
        theirs = {"boxes": ref.pred_boxes.tensor, "scores": ref.scores, "classes": ref.pred_classes}
        mine = {k: v.cpu() for k, v in out.items()}
        pairs = match(mine, theirs)
        print(f"  detections: ours {len(mine['scores'])}, detectron2 {len(theirs['scores'])}, matched {len(pairs)}")
        ok &= len(pairs) == len(mine["scores"]) == len(theirs["scores"])
        if pairs:
            i, j = map(torch.tensor, zip(*pairs))
            box_diff = (mine["boxes"][i] - theirs["boxes"][j]).abs().max().item()
            score_diff = (mine["scores"][i] - theirs["scores"][j]).abs().max().item()
            box_iou = pairwise_iou(mine["boxes"][i], theirs["boxes"][j]).diagonal().min().item()
            print(f"  boxes: max |diff| {box_diff:.3e} px, min IoU {box_iou:.5f}; scores: max |diff| {score_diff:.3e}")
            ok &= box_diff <= args.box_atol and score_diff <= args.score_atol
            if "masks" in mine and ref.has("pred_masks"):
                worst = mask_iou(mine["masks"][i].flatten(1), ref.pred_masks[j].flatten(1).bool()).min().item()
                print(f"  masks: min IoU {worst:.5f}")
                ok &= worst >= args.mask_iou
    if d2 is not None:
        print("EQUAL within tolerances" if ok else "DIFFERENT (see above)")
        raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
