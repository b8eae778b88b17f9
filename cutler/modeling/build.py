"""``build_model(cfg)``: the detector described by ``cfg.model`` (Detectron2's config semantics), and
``build_model_with_weights``: the same with a weights file loaded, the one way every entry point gets a
detector with weights."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from ..checkpoint import load_weights
from ..utils.device import resolve_device
from ..utils.logging import get_logger
from .backbone import build_backbone
from .meta_arch import GeneralizedRCNN, ProposalNetwork
from .proposal_generator import build_rpn

logger = get_logger(__name__)

_AMP_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def amp_dtype_from_cfg(cfg) -> Optional[torch.dtype]:
    """``cfg.solver.amp``: the autocast dtype, or ``None`` when AMP is off."""
    amp = cfg.solver.amp
    if not amp.enabled:
        return None
    if amp.dtype not in _AMP_DTYPES:
        raise ValueError(f"solver.amp.dtype={amp.dtype!r}; choose one of {sorted(_AMP_DTYPES)}")
    return _AMP_DTYPES[amp.dtype]


def build_model(cfg, device: Optional[str] = None) -> nn.Module:
    """Build the detector on ``device`` (default ``cfg.model.device``), randomly initialised.

    ``cfg.model.meta_architecture``: "GeneralizedRCNN" (backbone + RPN + the ROI heads named by
    ``cfg.model.roi_heads.name``), "PanopticFPN" (the same plus the semantic branch of
    ``cfg.model.sem_seg_head``) or "ProposalNetwork" (backbone + RPN). Weights are NOT loaded here:
    :func:`build_model_with_weights` loads them. Autocast
    (``cfg.solver.amp``) applies on CUDA only; ``cfg.model.channels_last`` converts the model and its
    inputs to channels-last. Inputs are always RGB; ``cfg.input.format == "BGR"`` (weights trained on BGR
    images, with ``pixel_mean``/``pixel_std`` in BGR order) flips them inside the model.
    """
    m = cfg.model
    backbone = build_backbone(cfg)
    shapes = backbone.output_shape()
    rpn = build_rpn(cfg, shapes)
    common = dict(pixel_mean=list(m.pixel_mean), pixel_std=list(m.pixel_std), amp_dtype=amp_dtype_from_cfg(cfg),
                  channels_last=bool(m.channels_last), input_format=str(cfg.input.format))
    if m.meta_architecture == "GeneralizedRCNN":
        from .roi_heads import build_roi_heads

        model: nn.Module = GeneralizedRCNN(backbone=backbone, proposal_generator=rpn,
                                           roi_heads=build_roi_heads(cfg, shapes), mask_on=bool(m.mask_on), **common)
    elif m.meta_architecture == "PanopticFPN":
        from .meta_arch.panoptic_fpn import build_panoptic_fpn

        model = build_panoptic_fpn(cfg, common, backbone, rpn)
    elif m.meta_architecture == "ProposalNetwork":
        model = ProposalNetwork(backbone=backbone, proposal_generator=rpn, **common)
    else:
        raise ValueError(f"model.meta_architecture={m.meta_architecture!r}; choose GeneralizedRCNN, PanopticFPN or "
                         "ProposalNetwork")
    model.to(resolve_device(device or m.device))
    if m.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def build_model_with_weights(cfg, weights: Optional[str | os.PathLike], strictness: str,
                             device: Optional[str | torch.device] = None) -> nn.Module:
    """:func:`build_model` on ``device`` with the weights file ``weights`` loaded (in training mode, as built).

    Args:
        cfg: the full config.
        weights: a local ``.pth``/``.pkl`` (see :mod:`cutler.checkpoint.weights`); empty or None keeps the
            random initialisation.
        strictness: how strictly the file must fit the model, one of
            :data:`cutler.checkpoint.weights.STRICTNESS`: ``"exact"`` for a checkpoint of this very model,
            ``"shapes"`` for weights to evaluate or continue from, ``"skip_mismatched"`` to initialise a
            model whose heads may differ (fine-tuning).
        device: default ``cfg.model.device``.

    Raises:
        ValueError: the file does not fit the model as ``strictness`` demands (the message names the key).
    """
    model = build_model(cfg, device=None if device is None else str(device))
    if weights:
        result = load_weights(model, str(weights), strictness=strictness)
        logger.info("weights from %s (strictness %s): %s", weights, strictness, result)
    return model
