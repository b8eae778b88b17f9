"""Zero-shot, class-agnostic evaluation: inference over datasets, COCO metrics, converters, CorLoc, reports.

Entry points for pipelines:

* :func:`evaluate_dataset` (model + config + catalog name -> ``{"bbox": {...}, "segm": {...}}``),
* :func:`evaluate_coco` (ground truth + COCO results -> metrics),
* :func:`evaluate_pseudo_labels` (a MaskCut / self-training annotation JSON against ground truth),
* :func:`run_zero_shot` (the 11-benchmark table), :func:`run_corloc` / :func:`corloc`.
"""
from .coco_eval import AGNOSTIC_CATEGORY, METRIC_NAMES, EvaluationInputError, evaluate_coco, to_class_agnostic
from .corloc import corloc
from .evaluator import (
    DatasetMissingError,
    build_eval_model,
    evaluate_corloc_dataset,
    evaluate_dataset,
    evaluate_results_file,
)
from .inference import instances_to_coco_results, iter_chunk_results, merge_chunks, prepare_input, run_inference
from .pseudo_labels import annotations_to_results, evaluate_pseudo_labels
from .zero_shot import run_corloc, run_zero_shot

__all__ = [
    "AGNOSTIC_CATEGORY", "METRIC_NAMES", "DatasetMissingError", "EvaluationInputError", "annotations_to_results",
    "build_eval_model", "corloc", "evaluate_coco", "evaluate_corloc_dataset", "evaluate_dataset",
    "evaluate_pseudo_labels", "evaluate_results_file", "instances_to_coco_results", "iter_chunk_results",
    "merge_chunks", "prepare_input", "run_corloc", "run_inference", "run_zero_shot", "to_class_agnostic",
]
