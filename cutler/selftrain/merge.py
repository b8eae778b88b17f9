"""Self-training label merge: confident predictions of round t become round t+1's pseudo-labels.

Rule (CutLER's self-training), per image:
- keep predictions with ``score >= score_thresh``;
- drop previous pseudo-masks whose mask IoU with ANY kept prediction is ``> drop_iou_thresh``;
- new labels = kept predictions + surviving previous masks (an image with no kept prediction
  keeps all its previous masks);
- annotation ids are renumbered 1..N, areas and boxes recomputed from the masks.

Labels are class-agnostic (one category "fg"), or, with ``keep_categories`` (U2Seg's clusters), every
kept prediction keeps its predicted ``category_id``, every surviving previous mask its own, and the
previous file's category list is kept.

Memory: masks stay run-length encoded (mask IoU is computed on RLEs by pycocotools), predictions are
read one chunk file at a time, and the output JSON is streamed to disk, so ImageNet-scale label sets
never sit decoded in memory. The previous labels are indexed as compressed RLE strings per image.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

from cutler.structures.rle import rle_area, rle_iou, rle_to_bbox, rle_to_json, segmentation_to_rle
from cutler.utils.io import atomic_open

FG_CATEGORY = {"id": 1, "name": "fg", "supercategory": "fg"}


def select_labels(prev_rles: Sequence[Dict], pred_rles: Sequence[Dict], pred_scores: Sequence[float],
                  score_thresh: float, drop_iou_thresh: float = 0.5) -> Tuple[List[int], List[int]]:
    """The merge rule for one image.

    Args:
        prev_rles: previous round's masks as compressed RLEs.
        pred_rles: this round's predicted masks as compressed RLEs.
        pred_scores: their confidence scores.
        score_thresh: predictions scoring at least this are kept.
        drop_iou_thresh: previous masks whose IoU with a kept prediction exceeds this are dropped.

    Returns:
        ``(kept_prediction_indices, kept_previous_indices)``.
    """
    kept_pred = [i for i, s in enumerate(pred_scores) if s >= score_thresh]
    if not kept_pred or not prev_rles:
        return kept_pred, list(range(len(prev_rles)))
    ious = rle_iou(prev_rles, [pred_rles[i] for i in kept_pred])  # rows: previous masks, columns: kept predictions
    kept_prev = [j for j in range(len(prev_rles)) if not (ious[j] > drop_iou_thresh).any()]
    return kept_pred, kept_prev


def iter_predictions(source: os.PathLike | str) -> Iterator[List[Dict]]:
    """Yield lists of COCO result dicts, a bounded block at a time (never the whole set).

    ``source`` is one of:

    * cutler's inference output folder (it has ``chunks/``), or that ``chunks/`` folder: the committed chunks
      are read one at a time, each image once (the merged ``coco_instances_results.json``, ``failures.json``
      and chunks of killed runs beside them are not read again);
    * a results ``.json`` (a list, streamed element by element; or a dict wrapping ``annotations``/``results``);
    * a ``.jsonl`` file (one result per line);
    * any other folder: its ``.json``/``.jsonl`` files, recursively, in sorted order.
    """
    from cutler.evaluation.inference import finished_chunks, iter_chunk_results
    from cutler.utils.io import iter_json_array

    source = Path(source)
    if source.is_dir():
        for out_dir in (source, source.parent if source.name == "chunks" else None):
            if out_dir is not None and finished_chunks(out_dir):
                for _, results, _ in iter_chunk_results(out_dir):
                    yield results
                return
        files = sorted(p for p in source.rglob("*") if p.suffix in (".json", ".jsonl") and not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"no .json/.jsonl prediction files in {source}")
        for f in files:
            yield from iter_predictions(f)
        return
    if not source.is_file():
        raise FileNotFoundError(f"predictions not found: {source}")
    if source.suffix == ".jsonl":
        block: List[Dict] = []
        with open(source) as f:
            for line in f:
                if line.strip():
                    block.append(json.loads(line))
                if len(block) >= 10000:
                    yield block
                    block = []
        if block:
            yield block
        return
    with open(source, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        yield from iter_json_array(source)
        return
    with open(source) as f:
        data = json.load(f)
    if isinstance(data, dict):  # a file may wrap its results
        data = data.get("annotations", data.get("results", []))
    if not isinstance(data, list):
        raise ValueError(f"{source}: expected a list of COCO results")
    yield data


@dataclass
class MergeStats:
    """What a merge did (printed per round by the pipeline)."""

    images: int = 0
    images_with_new_labels: int = 0
    kept_predictions: int = 0
    kept_previous: int = 0
    dropped_previous: int = 0
    annotations: int = 0
    per_image_counts: List[int] = field(default_factory=list, repr=False)

    def as_dict(self) -> Dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if k != "per_image_counts"}


def _annotation(rle: Dict, ann_id: int, image_id: int, score: float | None, category_id: int = FG_CATEGORY["id"]
                ) -> Dict:
    ann = {"id": ann_id, "image_id": image_id, "category_id": int(category_id), "iscrowd": 0, "area": rle_area(rle),
           "bbox": rle_to_bbox(rle), "segmentation": rle_to_json(rle)}
    if score is not None:
        ann["score"] = float(score)
    return ann


def merge_self_training_labels(prev_ann_file: os.PathLike | str, predictions: os.PathLike | str,
                               out_file: os.PathLike | str, score_thresh: float = 0.7,
                               drop_iou_thresh: float = 0.5, keep_categories: bool = False) -> MergeStats:
    """Write round t+1's label file from round t's labels and round t's predictions.

    Args:
        prev_ann_file: COCO JSON of the previous round's pseudo-labels (its ``images`` define the set).
        predictions: COCO results (``.json``, ``.jsonl`` or a folder of chunks) on the same images.
        out_file: where to write the new COCO JSON (atomically).
        score_thresh: the round's confidence threshold.
        drop_iou_thresh: mask IoU above which a previous mask is replaced by a kept prediction.
        keep_categories: keep the categories of predictions and previous masks (see the module docstring);
            a prediction whose ``category_id`` the previous file does not list is an error.

    Returns:
        :class:`MergeStats`.

    Raises:
        ValueError: an annotation file without images, or predictions on unknown image ids.
    """
    with open(prev_ann_file) as f:
        prev = json.load(f)
    images = prev.get("images") or []
    if not images:
        raise ValueError(f"{prev_ann_file}: no images in the previous label file")
    sizes = {im["id"]: (im["height"], im["width"]) for im in images}
    categories = (prev.get("categories") or [FG_CATEGORY]) if keep_categories else [FG_CATEGORY]
    known_categories = {c["id"] for c in categories}
    prev_by_image: Dict[int, List[Dict]] = defaultdict(list)
    prev_cats: Dict[int, List[int]] = defaultdict(list)
    for ann in prev.get("annotations", []):
        if ann["image_id"] not in sizes:
            raise ValueError(f"{prev_ann_file}: annotation {ann.get('id')} refers to unknown image id {ann['image_id']}")
        h, w = sizes[ann["image_id"]]
        prev_by_image[ann["image_id"]].append(segmentation_to_rle(ann["segmentation"], h, w))
        prev_cats[ann["image_id"]].append(int(ann.get("category_id", FG_CATEGORY["id"])) if keep_categories
                                          else FG_CATEGORY["id"])
    del prev
    # Only kept predictions are retained, as compressed RLEs grouped per image.
    pred_by_image: Dict[int, List[Tuple[Dict, float, int]]] = defaultdict(list)
    for block in iter_predictions(predictions):
        for res in block:
            if res["score"] < score_thresh:
                continue
            if res["image_id"] not in sizes:
                raise ValueError(f"prediction for image id {res['image_id']} which {prev_ann_file} does not list")
            cat = int(res.get("category_id", FG_CATEGORY["id"])) if keep_categories else FG_CATEGORY["id"]
            if cat not in known_categories:
                raise ValueError(f"prediction of category {cat} on image {res['image_id']}, which is not a category "
                                 f"of {prev_ann_file}")
            h, w = sizes[res["image_id"]]
            pred_by_image[res["image_id"]].append((segmentation_to_rle(res["segmentation"], h, w), float(res["score"]),
                                                   cat))

    stats = MergeStats(images=len(images))
    next_id = 1
    with atomic_open(out_file, "w", encoding="utf-8") as f:
        f.write('{"info": {"description": "cutler self-training labels"}, "categories": ')
        f.write(json.dumps(categories))
        f.write(', "images": ')
        f.write(json.dumps(images))
        f.write(', "annotations": [')
        first = True
        for im in images:
            prev_rles = prev_by_image.pop(im["id"], [])
            cats = prev_cats.pop(im["id"], [])
            preds = pred_by_image.pop(im["id"], [])
            kept_pred, kept_prev = select_labels(prev_rles, [p[0] for p in preds], [p[1] for p in preds],
                                                 score_thresh, drop_iou_thresh)
            new = [preds[i] for i in kept_pred] + [(prev_rles[j], None, cats[j]) for j in kept_prev]
            stats.kept_predictions += len(kept_pred)
            stats.kept_previous += len(kept_prev)
            stats.dropped_previous += len(prev_rles) - len(kept_prev)
            stats.images_with_new_labels += bool(kept_pred)
            count = 0
            for rle, score, cat in new:
                if rle_area(rle) < 1:
                    continue
                f.write(("" if first else ", ") + json.dumps(_annotation(rle, next_id, im["id"], score, cat)))
                first = False
                next_id += 1
                count += 1
            stats.per_image_counts.append(count)
        f.write("]}")
    stats.annotations = next_id - 1
    return stats


def merge_rounds_cli(argv: Iterable[str] | None = None) -> MergeStats:
    """Command-line entry point (see ``tools/get_self_training_ann.py``)."""
    import argparse

    parser = argparse.ArgumentParser(description="Build the next self-training round's labels.")
    parser.add_argument("--new-pred", required=True, help="predictions of this round (.json, .jsonl or folder)")
    parser.add_argument("--prev-ann", required=True, help="COCO JSON of the previous round's labels")
    parser.add_argument("--save-path", required=True, help="output COCO JSON")
    parser.add_argument("--threshold", type=float, default=0.7, help="confidence threshold of this round")
    parser.add_argument("--drop-iou", type=float, default=0.5, help="mask IoU above which previous masks are dropped")
    parser.add_argument("--keep-categories", action="store_true",
                        help="keep predicted and previous category ids (U2Seg cluster labels) instead of one 'fg'")
    args = parser.parse_args(list(argv) if argv is not None else None)
    stats = merge_self_training_labels(args.prev_ann, args.new_pred, args.save_path, args.threshold, args.drop_iou,
                                       args.keep_categories)
    print(json.dumps(stats.as_dict(), indent=1))
    return stats
