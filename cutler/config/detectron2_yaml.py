"""Detectron2 YAML <-> our schema: import CutLER/Detectron2 configs (``_BASE_`` inheritance, UPPER_CASE keys), and export ours.

The schema mirrors Detectron2's tree in lower case, so most keys map by lower-casing. An imported chain is
laid over Detectron2's defaults (:data:`DETECTRON2_DEFAULTS`, where they differ from ours), as Detectron2
lays it over ``get_cfg()``: a key the file omits builds what Detectron2 would build. What is left:
- keys Detectron2 has but cutler does not implement: accepted only at their inert value
  (``MODEL.KEYPOINT_ON: False``), otherwise a :class:`ConfigKeyError` says the feature is unsupported;
- keys with a fixed value or set of values here (``MODEL.META_ARCHITECTURE``: ``GeneralizedRCNN`` or
  ``PanopticFPN``): other values are refused;
- bookkeeping keys (``VERSION``) are dropped;
- anything else unknown is a typo: the error names the key, the file and the closest valid key.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping

import yaml
from omegaconf import OmegaConf

from .loader import ConfigKeyError, suggest_key, _schema_keys
from .schema import CutlerConfig

# Detectron2 keys accepted only at the value given (the feature they switch on is not implemented).
INERT_ONLY: Dict[str, Any] = {
    "MODEL.KEYPOINT_ON": False,
    "MODEL.LOAD_PROPOSALS": False,
    "MODEL.PROPOSAL_GENERATOR.NAME": "RPN",
    "MODEL.PROPOSAL_GENERATOR.MIN_SIZE": 0,
    "MODEL.SEM_SEG_HEAD.NAME": "SemSegFPNHead",
    "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone",
    "MODEL.RPN.HEAD_NAME": "StandardRPNHead",
    "MODEL.ROI_BOX_HEAD.NAME": "FastRCNNConvFCHead",
    "MODEL.ROI_MASK_HEAD.NAME": "MaskRCNNConvUpsampleHead",
    "MODEL.ANCHOR_GENERATOR.NAME": "DefaultAnchorGenerator",
    "INPUT.CROP.ENABLED": False,
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False, False, False, False],
    "TEST.AUG.ENABLED": False,
    "DATALOADER.REPEAT_THRESHOLD": 0.0,
}
# Detectron2 keys that carry no meaning for cutler and are dropped.
IGNORED = {"VERSION", "GLOBAL.HACK", "TEST.KEYPOINT_OKS_SIGMAS", "TEST.EXPECTED_RESULTS", "DATASETS.PROPOSAL_FILES_TRAIN",
           "DATASETS.PROPOSAL_FILES_TEST", "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN",
           "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST", "SOLVER.REFERENCE_WORLD_SIZE_ONLY"}
# Known Detectron2 subtrees cutler does not implement at all.
UNSUPPORTED_SECTIONS = ("MODEL.RETINANET", "MODEL.ROI_KEYPOINT_HEAD", "MODEL.DENSEPOSE", "INPUT.CROP")
# The allowed ROI head names (CutLER registers Custom* variants of Detectron2's).
ROI_HEAD_NAMES = {"StandardROIHeads", "CascadeROIHeads", "CustomStandardROIHeads", "CustomCascadeROIHeads"}
# The meta-architectures a Detectron2 YAML may name (Panoptic FPN: the detector plus a semantic branch).
META_ARCHITECTURES = {"GeneralizedRCNN", "PanopticFPN"}


# Detectron2's defaults (detectron2/config/defaults.py; CutLER's add_cutler_config adds its keys at our
# values) for every mapped key where our schema default differs. Detectron2 merges a YAML chain onto these;
# the importer does the same, so a key the file omits means what it means to Detectron2, not to our schema.
DETECTRON2_DEFAULTS: Dict[str, Any] = {
    # Detectron2's default architecture is a C4 R-CNN: ResNet without FPN, RPN and Res5ROIHeads on res4,
    # no box head name. cutler builds FPN models only, so a file that leaves these to Detectron2 is refused
    # (by INERT_ONLY / ROI_HEAD_NAMES, or by the model builder for the feature lists) instead of quietly
    # becoming an FPN model. Base-RCNN-FPN.yaml sets all of them.
    "MODEL.BACKBONE.NAME": "build_resnet_backbone",
    "MODEL.RESNETS.OUT_FEATURES": ["res4"],
    "MODEL.FPN.IN_FEATURES": [],
    "MODEL.RPN.IN_FEATURES": ["res4"],
    "MODEL.ROI_HEADS.NAME": "Res5ROIHeads",
    "MODEL.ROI_HEADS.IN_FEATURES": ["res4"],
    "MODEL.ROI_BOX_HEAD.NAME": "",
    "MODEL.ANCHOR_GENERATOR.SIZES": [[32, 64, 128, 256, 512]],  # one list, shared by every feature level
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 12000,
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 2000,
    "INPUT.MASK_FORMAT": "polygon",
    "DATASETS.TRAIN": [],
    "DATASETS.TEST": [],
    "OUTPUT_DIR": "./output",
}
# Deliberately not applied: MODEL.DEVICE ("cuda" in Detectron2). Ours is "auto", which uses CUDA wherever
# Detectron2's "cuda" would run; imposing "cuda" would change no model, only fail on CPU-only machines.


def _read_d2_yaml(path: Path, seen: frozenset = frozenset()) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"Detectron2 config file not found: {path}")
    if path in seen:
        raise ValueError(f"_BASE_ inheritance cycle through {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"cannot parse YAML config {path}: {e}") from e
    base = data.pop("_BASE_", None)
    if base is None:
        return data
    if isinstance(base, str) and base.startswith(("http://", "https://")):
        raise ValueError(f"{path}: _BASE_ '{base}' is a URL; cutler never downloads, give a local file")
    base_data = _read_d2_yaml((path.parent / os.path.expanduser(str(base))).resolve(), seen | {path})
    return _deep_merge(base_data, data)


def _deep_merge(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _flatten(data: Mapping, prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            flat.update(_flatten(v, full))
        else:
            flat[full] = v
    return flat


def _normalise(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value


def _parse_tuple_string(value: Any) -> Any:
    # YAML gives "(240, 320)" as a string: Detectron2 evaluates it as a Python literal.
    if isinstance(value, str) and value.strip().startswith("(") and value.strip().endswith(")"):
        import ast

        try:
            return list(ast.literal_eval(value))
        except (ValueError, SyntaxError):
            return value
    return value


def detectron2_default_layer(file_keys) -> Dict[str, Any]:
    """The entries of :data:`DETECTRON2_DEFAULTS` that a YAML chain with flat keys ``file_keys`` leaves unset."""
    given = set(file_keys)
    return {k: v for k, v in DETECTRON2_DEFAULTS.items() if k not in given}


def import_detectron2_yaml(path: os.PathLike | str) -> dict:
    """Read a CutLER/Detectron2 YAML (with ``_BASE_`` chain) and return a nested dict in our schema.

    Keys the chain omits get Detectron2's default where it differs from ours (:data:`DETECTRON2_DEFAULTS`),
    so the result builds the model Detectron2 would build from the same file.

    Raises:
        ConfigKeyError: for unsupported features and unknown keys (message names key, file, neighbour),
            including a Detectron2 default the file leaves in place that cutler does not implement.
    """
    path = Path(path).resolve()
    flat = _flatten(_read_d2_yaml(path))
    schema = OmegaConf.structured(CutlerConfig)
    valid = set(_schema_keys(schema))
    upper_valid = {k.upper(): k for k in valid}
    out: dict = {}
    # The file's own keys first, so that its typos and unsupported features are reported before any
    # consequence of the defaults underneath.
    sources = [(key, value, str(path)) for key, value in flat.items()]
    sources += [(key, value, f"{path} (Detectron2's default for '{key}', which the file does not set)")
                for key, value in detectron2_default_layer(flat).items()]
    for key, value, where in sources:
        value = _normalise(_parse_tuple_string(value))
        if key in IGNORED:
            continue
        if key in INERT_ONLY:
            expected = INERT_ONLY[key]
            if value != expected:
                raise ConfigKeyError(
                    f"{where}: '{key}: {value}' is not supported by cutler (only '{expected}' is implemented)"
                )
            if key.lower() not in valid:
                continue
        if key.startswith(UNSUPPORTED_SECTIONS):
            raise ConfigKeyError(f"{where}: '{key}' belongs to a Detectron2 feature cutler does not implement")
        if key == "MODEL.META_ARCHITECTURE" and value not in META_ARCHITECTURES:
            raise ConfigKeyError(f"{where}: 'MODEL.META_ARCHITECTURE: {value}' is not supported by cutler (one of "
                                 f"{sorted(META_ARCHITECTURES)})")
        if key == "MODEL.ROI_HEADS.NAME" and value not in ROI_HEAD_NAMES:
            raise ConfigKeyError(
                f"{where}: MODEL.ROI_HEADS.NAME '{value}' is not supported (one of {sorted(ROI_HEAD_NAMES)})"
            )
        ours = upper_valid.get(key)
        if ours is None:
            hint = suggest_key(key, list(upper_valid))
            msg = f"unknown Detectron2 config key '{key}' in {where}"
            raise ConfigKeyError(msg + (f"; did you mean '{hint}'?" if hint else ""))
        node = out
        parts = ours.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


# Our keys that Detectron2's config does not have: dropped when exporting for a Detectron2 build.
CUTLER_ONLY_SECTIONS = ("maskcut", "selftrain", "eval", "pipeline", "u2seg", "stego", "panoptic", "unsam")
CUTLER_ONLY_KEYS = {
    "model.channels_last", "datasets.root", "solver.checkpoint_keep_last", "solver.nan_policy", "solver.amp.dtype",
    "solver.log_period", "solver.ddp_find_unused_parameters", "dataloader.max_instances_per_image",
}
# Keys the CutLER fork adds to Detectron2's config.
CUTLER_FORK_KEYS = {
    "model.roi_heads.use_droploss", "model.roi_heads.droploss_iou_thresh", "solver.base_lr_multiplier",
    "solver.base_lr_multiplier_names", "dataloader.copy_paste", "dataloader.copy_paste_rate",
    "dataloader.copy_paste_min_ratio", "dataloader.copy_paste_max_ratio", "dataloader.copy_paste_random_num",
    "dataloader.visualize_copy_paste", "test.no_segm",
}


def export_detectron2_yaml(cfg, include_cutler_fork_keys: bool = True) -> str:
    """Our config as a Detectron2/CutLER YAML string (UPPER_CASE keys) that Detectron2's ``merge_from_file``
    accepts: keys Detectron2 does not know are left out, and settings it cannot express raise.

    Args:
        cfg: a config from :func:`cutler.config.load_config`.
        include_cutler_fork_keys: keep the keys CutLER adds to Detectron2's config (DropLoss,
            copy-paste, LR multipliers); drop them for a plain Detectron2 build.
    """
    container = OmegaConf.to_container(cfg, resolve=True)
    out: dict = {}
    for key, value in _flatten(container).items():
        if key.split(".", 1)[0] in CUTLER_ONLY_SECTIONS or key in CUTLER_ONLY_KEYS:
            continue
        if not include_cutler_fork_keys and key in CUTLER_FORK_KEYS:
            continue
        if key == "model.device" and value == "auto":
            continue  # Detectron2 has no "auto"; omitted, its default "cuda" applies (and imports back as "auto")
        if key == "solver.clip_gradients.clip_type" and value not in ("value", "norm"):
            raise ValueError(f"solver.clip_gradients.clip_type={value!r} has no Detectron2 equivalent (its "
                             "GradientClipType is 'value' or 'norm', both per parameter); export a config using one")
        node = out
        parts = key.upper().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return yaml.safe_dump(out, sort_keys=True)
