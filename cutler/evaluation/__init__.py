"""Zero-shot, class-agnostic evaluation: inference over datasets, COCO metrics, converters, CorLoc, reports.

Entry points for pipelines:

* :func:`evaluate_dataset` (model + config + catalog name -> ``{"bbox": {...}, "segm": {...}}``),
* :func:`evaluate_coco` (ground truth + COCO results -> metrics),
* :func:`evaluate_pseudo_labels` (a MaskCut / self-training annotation JSON against ground truth),
* :func:`run_zero_shot` (the 11-benchmark table), :func:`corloc`.
"""
from .coco_eval import AGNOSTIC_CATEGORY, METRIC_NAMES, EvaluationInputError, evaluate_coco, to_class_agnostic
from .evaluator import DatasetMissingError, evaluate_dataset, evaluate_results_file
from .inference import instances_to_coco_results, merge_chunks, prepare_input, run_inference

__all__ = [
    "AGNOSTIC_CATEGORY", "METRIC_NAMES", "DatasetMissingError", "EvaluationInputError", "evaluate_coco",
    "evaluate_dataset", "evaluate_results_file", "instances_to_coco_results", "merge_chunks", "prepare_input",
    "run_inference", "to_class_agnostic",
]
