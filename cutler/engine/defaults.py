"""What ``tools/train_net.py`` and pipelines share: the default evaluator and the command-line flow."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from torch import nn

from cutler.checkpoint import Checkpointer
from cutler.evaluation import evaluate_dataset
from cutler.modeling.build import build_model_with_weights
from cutler.utils.logging import get_logger, setup_logger

from .trainer import train

logger = get_logger(__name__)

TINY_CONFIG = "tiny/synthetic_cascade.yaml"


def default_evaluator(cfg) -> Optional[Callable[[nn.Module, object], Dict[str, float]]]:
    """``evaluate(model, cfg)`` over ``cfg.datasets.test`` with :func:`cutler.evaluation.evaluate_dataset`,
    flattened to ``{"<dataset>/<bbox|segm>/<metric>": value}``; None when no test set is configured."""
    if not list(cfg.datasets.test):
        return None

    def evaluate(model: nn.Module, cfg) -> Dict[str, float]:
        flat: Dict[str, float] = {}
        for name in cfg.datasets.test:
            res = evaluate_dataset(model, cfg, name, output_dir=Path(cfg.output_dir) / "inference" / name,
                                   root=cfg.datasets.root)
            for iou_type, metrics in res.items():
                for metric, value in metrics.items():
                    flat[f"{name}/{iou_type}/{metric}"] = float(value)
        return flat

    return evaluate


def eval_only_model(cfg) -> nn.Module:
    """The detector for ``--eval-only``, in eval mode: ``model.weights`` if set (loaded as the trainer loads
    initial weights), else the run's last checkpoint, which must fit the model exactly."""
    if cfg.model.weights:
        return build_model_with_weights(cfg, cfg.model.weights, "skip_mismatched").eval()
    path = Checkpointer(cfg.output_dir).last_checkpoint()
    if path is None:
        raise FileNotFoundError(f"--eval-only: model.weights is empty and {cfg.output_dir} holds no checkpoint")
    logger.info("evaluating %s", path)
    return build_model_with_weights(cfg, path, "exact").eval()


def ensure_builtin_data(cfg) -> None:
    """Generate the synthetic dataset under ``cfg.datasets.root`` when the config trains or tests on it."""
    if any(str(n).startswith("synthetic_") for n in list(cfg.datasets.train) + list(cfg.datasets.test)):
        from cutler.data.synthetic import ensure_synthetic_dataset

        ensure_synthetic_dataset(cfg.datasets.root)


def train_net_main(args: argparse.Namespace):
    """One process of ``tools/train_net.py``: load the config, then train (or evaluate)."""
    from cutler.config import config_from_args

    extra = [] if args.config_file else ["model.device=cpu"]
    if not args.config_file:
        args.config_file = TINY_CONFIG
    cfg = config_from_args(args, extra)
    setup_logger(cfg.output_dir)
    if args.eval_only:
        evaluate = default_evaluator(cfg)
        if evaluate is None:
            raise RuntimeError("--eval-only needs datasets.test")
        with torch.no_grad():
            results = evaluate(eval_only_model(cfg), cfg)
        logger.info("results: %s", results)
        return results
    return train(cfg, resume=args.resume, evaluate=default_evaluator(cfg) if int(cfg.test.eval_period) > 0 else None)
