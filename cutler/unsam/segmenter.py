"""Whole-image segmenters trained on UnSAM pseudo-masks, by name (``unsam.learn.segmenter``).

A segmenter is anything that trains on a COCO instance JSON of class-agnostic masks and then, given images,
returns scored masks through the detector interface of :func:`cutler.evaluation.inference.run_inference`
(a list of ``{"image": uint8 (3, h, w), "height", "width"}`` -> a list of ``{"instances": {"boxes", "scores",
"masks"}}``). The pipeline, the evaluation and the self-training merge only use that interface, so another mask
head (the published Mask2Former, for one) plugs in with :func:`register_segmenter` and its own config schema
keys, without touching them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict

from ..pipeline.runner import train_round
from ..utils.logging import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class Segmenter:
    """How to train and load one kind of whole-image segmenter.

    Attributes:
        train: ``(cfg, num_gpus) -> None``; trains on ``cfg.datasets.train`` into ``cfg.output_dir``, leaving
            ``model_final.pth`` there and resuming from its last checkpoint when rerun.
        build: ``(cfg, weights path) -> model`` in eval mode, following the detector interface.
        description: one line for listings.
    """

    train: Callable[[Any, int], None]
    build: Callable[[Any, str], Any]
    description: str = ""


def _build_cascade(cfg: Any, weights: str) -> Any:
    from ..modeling.build import build_model_with_weights

    return build_model_with_weights(cfg, weights, "shapes").eval()


SEGMENTERS: Dict[str, Segmenter] = {
    "cascade_mask_rcnn": Segmenter(
        train_round, _build_cascade,
        "our Cascade Mask R-CNN (the CutLER detector) as a whole-image segmenter; its model.*/solver.* config keys"),
}


def register_segmenter(name: str, segmenter: Segmenter, overwrite: bool = False) -> None:
    """Make ``segmenter`` available as ``unsam.learn.segmenter=name``."""
    if name in SEGMENTERS and not overwrite:
        raise KeyError(f"segmenter '{name}' is already registered")
    SEGMENTERS[name] = segmenter


def get_segmenter(name: str) -> Segmenter:
    """The registered segmenter ``name``.

    Raises:
        KeyError: an unknown name, with the registered ones.
    """
    if name not in SEGMENTERS:
        raise KeyError(f"unknown unsam.learn.segmenter '{name}'; registered: {sorted(SEGMENTERS)}")
    return SEGMENTERS[name]
