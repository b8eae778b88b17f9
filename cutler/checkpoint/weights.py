"""Detector weights in the formats users bring: reading, loading into a model, saving, exporting.

No pickled code is ever executed. Accepted inputs (local files only; URLs are refused because nothing is
downloaded at run time):

* Detectron2 / our ``.pth``: ``{"model": state_dict, ...}`` or a bare state dict, read with
  ``torch.load(weights_only=True)``. A ``"state_dict"`` wrapper is also understood.
* ``.pkl``: pickles of numpy arrays (Detectron2 model zoo ``{"model": ..., "__author__": ...}``,
  Caffe2/Detectron1 ``{"blobs": ...}`` or a flat dict), read with
  :class:`~cutler.checkpoint.safe_pickle.RestrictedUnpickler`.
* torchvision-format ResNet state dicts (e.g. DINO ResNet-50: ``conv1.weight``, ``bn1.*``,
  ``layer1.0.downsample.0.weight``, ...), mapped onto ``backbone.bottom_up.*``; ``fc.*`` is ignored.

Names are mapped by :func:`~cutler.checkpoint.key_mapping.map_checkpoint_keys`. How strictly a file must
fit the model is always stated by the caller (:data:`STRICTNESS`).
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from cutler.utils.io import atomic_open, atomic_torch_save

from .key_mapping import map_checkpoint_keys
from .safe_pickle import UnsafePickleError, restricted_pickle_load

logger = logging.getLogger(__name__)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")

#: How strictly a weights file must fit the model:
#: ``"exact"``: every tensor of the model comes from the file with its shape and every tensor of the file is
#: used (``load_state_dict(strict=True)``; our own checkpoints); ``"shapes"``: tensors present in both must
#: have equal shapes, missing and unused ones are logged (converted and backbone-only files);
#: ``"skip_mismatched"``: like ``"shapes"``, but a tensor of another shape keeps the model's initial value
#: (fine-tuning with another number of classes, as Detectron2's checkpointer does).
STRICTNESS = ("exact", "shapes", "skip_mismatched")


# ---------------------------------------------------------------------------------------- reading
def _refuse_url(path: str) -> None:
    if _URL.match(str(path)):
        raise ValueError(f"'{path}' is a URL; cutler does not download weights. Download the file yourself "
                         "and pass its local path (e.g. model.weights=/path/to/model_final.pth).")


def _to_tensor(value: Any, key: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, copy=True))
    if isinstance(value, (np.generic, int, float)):
        return torch.as_tensor(np.asarray(value))
    raise TypeError(f"checkpoint entry '{key}' is a {type(value).__name__}, not an array or tensor")


def torch_load_weights_only(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU: tensors, numbers, strings and containers only.

    Raises:
        UnsafePickleError: the file holds other objects (the message says how to re-save it).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(
            f"'{path}' contains objects that torch.load(weights_only=True) refuses to load (arbitrary "
            f"Python objects are never unpickled here). Re-save only the weights, e.g. "
            f"torch.save({{'model': state_dict}}, path), in an environment you trust. Details: {e}") from e


def read_checkpoint(path: str) -> Dict[str, Any]:
    """Read a weights file into ``{"model": {name: Tensor}, "__author__": str, "format": str}``.

    ``format`` is "caffe2" for Caffe2/Detectron1 pickles (names still in Caffe2 style), otherwise
    "detectron2" (``.pth`` or a Detectron2-zoo ``.pkl``). Non-model entries of a ``.pth`` (optimizer,
    iteration, ...) are returned under ``"extra"``.
    """
    _refuse_url(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file '{path}' does not exist")
    if str(path).endswith(".pkl"):
        with open(path, "rb") as f:
            data = restricted_pickle_load(f)
        if not isinstance(data, Mapping):
            raise ValueError(f"'{path}': expected a dict in the pickle, got {type(data).__name__}")
        if "model" in data and "__author__" in data:
            state, author, fmt = data["model"], str(data["__author__"]), "detectron2"
        else:
            state = data.get("blobs", data)
            state = {k: v for k, v in state.items() if not k.endswith("_momentum")}
            author, fmt = "Caffe2", "caffe2"
        extra = {}
    else:
        data = torch_load_weights_only(path)
        if not isinstance(data, Mapping):
            raise ValueError(f"'{path}': expected a dict, got {type(data).__name__}")
        for wrapper in ("model", "state_dict"):
            if wrapper in data and isinstance(data[wrapper], Mapping):
                state = data[wrapper]
                extra = {k: v for k, v in data.items() if k != wrapper}
                break
        else:
            state, extra = data, {}
        author, fmt = str(extra.get("__author__", "")), "detectron2"
    model = {str(k): _to_tensor(v, str(k)) for k, v in state.items()}
    return {"model": model, "__author__": author, "format": fmt, "extra": extra}


# ------------------------------------------------------------------------------------------ loading
@dataclass
class LoadResult:
    """What :func:`load_weights` did. Keys are model names (``mismatched``: ``(key, ckpt, model)`` shapes)."""

    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    skipped_mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    ignored_keys: List[str] = field(default_factory=list)
    author: str = ""


def _model_state_shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_weights(model: nn.Module, path: str, strictness: str = "shapes") -> LoadResult:
    """Load the weights file ``path`` into ``model`` (in place) and report what happened.

    Args:
        model: any module whose state-dict keys use Detectron2's names (our detector, a backbone, ...).
        path: local ``.pth``/``.pkl`` (see the module docstring); URLs raise ``ValueError``.
        strictness: one of :data:`STRICTNESS`.

    Raises:
        ValueError: a shape mismatch (naming the key and both shapes) unless ``"skip_mismatched"``; under
            ``"exact"`` also missing or unused tensors (naming them and the file).
        UnsafePickleError: when a ``.pkl`` references a non-allow-listed global.

    Except under ``"exact"``, missing keys ignore BatchNorm's ``num_batches_tracked`` and checkpoint
    ``num_batches_tracked`` entries without a model counterpart (FrozenBN) are dropped silently.
    """
    if strictness not in STRICTNESS:
        raise ValueError(f"strictness must be one of {STRICTNESS}, got {strictness!r}")
    ckpt = read_checkpoint(path)
    shapes = _model_state_shapes(model)
    state, ignored = map_checkpoint_keys(ckpt["model"], shapes, ckpt["format"])
    if strictness == "exact":
        _check_exact(state, shapes, path)
    result = LoadResult(ignored_keys=ignored, author=ckpt["__author__"])
    to_load: Dict[str, Tensor] = {}
    for key, value in state.items():
        if key not in shapes:
            if not key.endswith("num_batches_tracked"):
                result.unexpected_keys.append(key)
            continue
        if tuple(value.shape) != shapes[key]:
            if strictness != "skip_mismatched":
                raise ValueError(f"shape mismatch for '{key}': checkpoint {tuple(value.shape)} vs model {shapes[key]} "
                                 f"(in '{path}'); strictness 'skip_mismatched' keeps the model's initial value")
            result.skipped_mismatched.append((key, tuple(value.shape), shapes[key]))
            continue
        to_load[key] = value
    model.load_state_dict(to_load, strict=False)
    result.missing_keys = sorted(k for k in shapes if k not in to_load and not k.endswith("num_batches_tracked")
                                 and k not in {m[0] for m in result.skipped_mismatched})
    logger.info("loaded %d/%d tensors from %s (author: %s)", len(to_load), len(shapes), path, result.author or "?")
    if result.missing_keys:
        logger.warning("keys missing from %s (left at initial values): %s", path, _summarise(result.missing_keys))
    if result.unexpected_keys:
        logger.warning("keys in %s not used by the model: %s", path, _summarise(result.unexpected_keys))
    for key, c, m in result.skipped_mismatched:
        logger.warning("skipped '%s': checkpoint shape %s, model shape %s", key, c, m)
    if ignored:
        logger.info("ignored classifier keys: %s", _summarise(ignored))
    return result


def _check_exact(state: Mapping[str, Tensor], shapes: Mapping[str, Tuple[int, ...]], path: str) -> None:
    """Raise ``ValueError`` unless ``state`` holds exactly the model's tensors, each with the model's shape."""
    missing = sorted(set(shapes) - set(state))
    unused = sorted(set(state) - set(shapes))
    if missing or unused:
        raise ValueError(f"'{path}' does not fit the model exactly: missing {_summarise(missing) or 'none'}; "
                         f"not in the model {_summarise(unused) or 'none'}")


def _summarise(keys: List[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


# ------------------------------------------------------------------------------------------- saving
def _cpu_state(model: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(model: nn.Module, path: str, **extra: Any) -> None:
    """Save ``{"model": state_dict, **extra}`` with ``torch.save`` (Detectron2's ``.pth`` layout; extra
    entries must be weights_only-loadable: tensors, numbers, strings, containers), atomically: an
    interrupted save never leaves a truncated file."""
    atomic_torch_save({"model": _cpu_state(model), **extra}, path)


def export_detectron2(model: nn.Module, path: str) -> None:
    """Write the model's weights for Detectron2: ``.pkl`` -> ``{"model": {name: ndarray},
    "__author__": "cutler", "matching_heuristics": False}`` (Detectron2 model-zoo pickle layout);
    anything else -> ``torch.save({"model": state_dict, "__author__": "cutler"})``. Our key names are
    Detectron2's, so no renaming is needed; the non-persistent buffers (pixel mean/std, anchors) are
    not written, as in Detectron2. Written atomically."""
    if not str(path).endswith(".pkl"):
        save_checkpoint(model, path, __author__="cutler")
        return
    payload = {"model": {k: v.numpy() for k, v in _cpu_state(model).items()}, "__author__": "cutler",
               "matching_heuristics": False}
    with atomic_open(path, "wb") as f:
        pickle.dump(payload, f, protocol=4)


__all__ = ["STRICTNESS", "LoadResult", "export_detectron2", "load_weights", "read_checkpoint", "save_checkpoint",
           "torch_load_weights_only"]
