"""Evaluating a detector on a named dataset of the catalog: inference + class-agnostic COCO metrics + report."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from ..data.catalog import ResolvedDataset, get_dataset
from ..modeling.build import build_model_with_weights
from ..utils.io import atomic_write_json
from ..utils.logging import get_logger
from .coco_eval import evaluate_coco, gt_has_masks, load_json
from .corloc import corloc
from .inference import _read_json, run_inference
from .report import json_safe, write_metrics_report

logger = get_logger(__name__)


class DatasetMissingError(FileNotFoundError):
    """A registered dataset whose JSON or image folder is not on disk (the message says which)."""


def resolve_available(name: str, root: Optional[os.PathLike | str] = None) -> ResolvedDataset:
    """The dataset ``name`` resolved under ``root``; raises :class:`DatasetMissingError` if absent."""
    ds = get_dataset(name, root)
    if not ds.json_file.is_file():
        raise DatasetMissingError(f"{name}: annotation file {ds.json_file} not found (see datasets/README.md)")
    if not ds.image_root.is_dir():
        raise DatasetMissingError(f"{name}: image folder {ds.image_root} not found (see datasets/README.md)")
    return ds


def _cfg_get(cfg: Any, dotted: str, default: Any) -> Any:
    """``cfg.a.b`` for an OmegaConf config, a nested mapping or plain objects; ``default`` when absent."""
    node = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else getattr(node, part, None)
        if node is None:
            return default
    return node


def _resolve(cfg: Any, dataset_name: str, output_dir: Optional[os.PathLike | str],
             root: Optional[os.PathLike | str]) -> Tuple[ResolvedDataset, Dict[str, Any], Path]:
    ds = resolve_available(dataset_name, root if root is not None else _cfg_get(cfg, "datasets.root", None))
    out = Path(output_dir) if output_dir is not None else Path(_cfg_get(cfg, "output_dir", "output")) / "inference" / dataset_name
    return ds, load_json(ds.json_file), out


def _infer(model: Any, cfg: Any, ds: ResolvedDataset, gt: Mapping[str, Any], out: Path, with_masks: bool,
           class_aware: bool = False) -> Optional[Path]:
    """:func:`run_inference` with the settings of ``cfg``."""
    return run_inference(
        model, gt["images"], ds.image_root, out,
        min_size=int(_cfg_get(cfg, "input.min_size_test", 800)),
        max_size=int(_cfg_get(cfg, "input.max_size_test", 1333)),
        batch_size=int(_cfg_get(cfg, "eval.batch_size", 2)),
        num_workers=int(_cfg_get(cfg, "dataloader.num_workers", 0)),
        chunk_size=int(_cfg_get(cfg, "eval.chunk_size", 500)),
        max_dets=int(_cfg_get(cfg, "eval.max_dets", 100)),
        with_masks=with_masks,
        class_aware=class_aware,
        resume=bool(_cfg_get(cfg, "eval.resume", True)),
    )


def evaluate_dataset(
    model: Any,
    cfg: Any,
    dataset_name: str,
    output_dir: Optional[os.PathLike | str] = None,
    root: Optional[os.PathLike | str] = None,
    iou_types: Optional[Sequence[str]] = None,
) -> Dict[str, Dict[str, float]]:
    """Run ``model`` over a catalog dataset and compute class-agnostic COCO metrics.

    Args:
        model: detector following the eval interface (see :func:`cutler.evaluation.inference.run_inference`).
        cfg: the configuration (uses ``input.min_size_test/max_size_test``, ``eval.batch_size/max_dets/
            chunk_size/resume``, ``dataloader.num_workers``, ``model.mask_on``, ``test.no_segm``,
            ``datasets.root``, ``output_dir``).
        dataset_name: a name of :mod:`cutler.data.catalog` (e.g. ``"coco_2017_val"``).
        output_dir: where results and the report go; default ``<cfg.output_dir>/inference/<dataset_name>``.
        root: datasets root; default ``cfg.datasets.root``.
        iou_types: default ``("bbox", "segm")`` when the model predicts masks, the dataset has masks and
            ``test.no_segm`` is off, else ``("bbox",)``.

    Returns:
        ``{"bbox": {metric: %}, "segm": {...}}`` on the process that merged the results (rank 0 under
        torch.distributed); ``{}`` on the others. Files: ``coco_instances_results.json``,
        ``metrics_<name>.{json,md,csv}`` and ``failures.json`` in ``output_dir``.

    Raises:
        DatasetMissingError: the dataset's JSON or images are not on disk.
    """
    ds, gt, out = _resolve(cfg, dataset_name, output_dir, root)
    mask_on = bool(_cfg_get(cfg, "model.mask_on", False)) and not bool(_cfg_get(cfg, "test.no_segm", False))
    if iou_types is None:
        iou_types = ("bbox", "segm") if mask_on and ds.has_masks and gt_has_masks(gt) else ("bbox",)
    results_path = _infer(model, cfg, ds, gt, out, with_masks="segm" in iou_types)
    if results_path is None:
        return {}
    metrics = evaluate_coco(gt, results_path, iou_types=iou_types, max_dets=int(_cfg_get(cfg, "eval.max_dets", 100)))
    failures = _read_json(out / "failures.json")
    table = write_metrics_report(out, dataset_name, metrics, extra={
        "num_images": len(gt["images"]), "num_unreadable_images": len(failures),
        "results_file": str(results_path), "json_file": str(ds.json_file)})
    logger.info("\n%s", table)
    if failures:
        logger.warning("%s: %d images could not be read and have no predictions (see %s)", dataset_name,
                       len(failures), out / "failures.json")
    return metrics


def evaluate_corloc_dataset(model: Any, cfg: Any, dataset_name: str, output_dir: Optional[os.PathLike | str] = None,
                            root: Optional[os.PathLike | str] = None) -> Dict[str, float]:
    """CorLoc of ``model`` on a catalog dataset (see :mod:`cutler.evaluation.corloc`).

    Runs box-only inference into ``output_dir`` (default ``<cfg.output_dir>/inference/<name>``), so
    results already computed there for the same dataset by a box-only evaluation are reused.
    Returns ``{"corloc": %, ...}`` on the merging process, ``{}`` on the others.
    """
    ds, gt, out = _resolve(cfg, dataset_name, output_dir, root)
    results_path = _infer(model, cfg, ds, gt, out, with_masks=False)
    if results_path is None:
        return {}
    result = corloc(gt, results_path)
    atomic_write_json(out / f"corloc_{dataset_name}.json", {"dataset": dataset_name, **json_safe(result)}, indent=2)
    logger.info("%s: CorLoc %.1f%% (%d/%d images)", dataset_name, result["corloc"], result["num_correct"],
                result["num_images"])
    return result


def evaluate_results_file(results: os.PathLike | str, dataset_name: str, root: Optional[os.PathLike | str] = None,
                          iou_types: Optional[Sequence[str]] = None, max_dets: int = 100
                          ) -> Dict[str, Dict[str, float]]:
    """Class-agnostic metrics of an existing COCO results file on a catalog dataset (no model needed)."""
    ds = resolve_available(dataset_name, root)
    gt = load_json(ds.json_file)
    if iou_types is None:
        iou_types = ("bbox", "segm") if ds.has_masks and gt_has_masks(gt) else ("bbox",)
    return evaluate_coco(gt, results, iou_types=iou_types, max_dets=max_dets)


def build_eval_model(cfg: Any, weights: Optional[str] = None, device: Optional[str] = None) -> Any:
    """The detector of ``cfg`` in eval mode, with ``weights`` (else ``cfg.model.weights``) loaded; tensors of
    the file must have the model's shapes.

    Without weights the model keeps its random initialisation and a loud warning is logged: useful for
    smoke tests only, the numbers mean nothing.
    """
    path = weights or _cfg_get(cfg, "model.weights", "")
    if not path:
        logger.warning("!" * 80)
        logger.warning("NO WEIGHTS GIVEN: the detector is RANDOMLY INITIALISED; its predictions are noise "
                       "(use --weights / model.weights for real results)")
        logger.warning("!" * 80)
    return build_model_with_weights(cfg, path, "shapes", device=device).eval()


__all__ = ["build_eval_model", "evaluate_corloc_dataset", "DatasetMissingError", "evaluate_dataset",
           "evaluate_results_file", "resolve_available"]
