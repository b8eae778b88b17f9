"""Loading and saving detector weights in the formats users bring, without executing pickled code.

Accepted inputs (local files only; URLs are refused because nothing is downloaded at run time):

* Detectron2 / our ``.pth``: ``{"model": state_dict, ...}`` or a bare state dict, read with
  ``torch.load(weights_only=True)``. A ``"state_dict"`` wrapper is also understood.
* ``.pkl``: pickles of numpy arrays (Detectron2 model zoo ``{"model": ..., "__author__": ...}``,
  Caffe2/Detectron1 ``{"blobs": ...}`` or a flat dict), read with :class:`RestrictedUnpickler`, which
  only resolves plain containers and numpy's array/dtype/scalar reconstructors.
* torchvision-format ResNet state dicts (e.g. DINO ResNet-50: ``conv1.weight``, ``bn1.*``,
  ``layer1.0.downsample.0.weight``, ...), mapped onto ``backbone.bottom_up.*``; ``fc.*`` is ignored.

Key mapping, in order: Caffe2 names (``res2_0_branch2a_w``, ``res_conv1_bn_s``, ``conv1_w``) are
converted as Detectron2's c2 loader does; torchvision ResNet names are converted; a leading
``module.`` (DistributedDataParallel) is stripped; a key absent from the model but present under the
``backbone.bottom_up.`` prefix (backbone-only Detectron2 pickles such as the converted DINO/MoCo
ResNets) is moved there.
"""
from __future__ import annotations

import codecs
import io
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np
import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

BACKBONE_PREFIX = "backbone.bottom_up."
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


# ------------------------------------------------------------------------------------ safe unpickling
class UnsafePickleError(pickle.UnpicklingError):
    """A pickle referenced a global outside the allow-list (it was not called)."""


def _numpy_attr(*paths: str):
    for path in paths:
        module_name, _, attr = path.rpartition(".")
        try:
            module = __import__(module_name, fromlist=[attr])
            return getattr(module, attr)
        except (ImportError, AttributeError):
            continue
    return None


def _latin1_encode(obj, encoding="latin1", *rest):
    """``_codecs.encode`` as Python 3 writes bytes into protocol-2 pickles; only latin-1 is allowed."""
    if encoding not in ("latin1", "latin-1") or rest:
        raise UnsafePickleError(f"pickle asked for _codecs.encode with encoding {encoding!r}; only latin1 is allowed")
    return codecs.encode(obj, "latin1")


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    reconstruct = _numpy_attr("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct")
    scalar = _numpy_attr("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar")
    frombuffer = _numpy_attr("numpy._core.numeric._frombuffer", "numpy.core.numeric._frombuffer")
    import collections

    table = {("collections", "OrderedDict"): collections.OrderedDict,
             ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
             ("_codecs", "encode"): _latin1_encode}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(mod, "_reconstruct")] = reconstruct
        table[(mod, "scalar")] = scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        table[(mod, "_frombuffer")] = frombuffer
    return {k: v for k, v in table.items() if v is not None}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only an allow-list of globals: ``collections.OrderedDict`` and
    numpy's ``ndarray``/``dtype``/``_reconstruct``/``scalar``/``_frombuffer`` (plus latin-1
    ``_codecs.encode`` used by protocol-2 bytes). Any other global raises :class:`UnsafePickleError`
    naming it, before anything is called."""

    _ALLOWED = None

    def find_class(self, module: str, name: str):
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = _allowed_globals()
        try:
            return RestrictedUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load pickle: it references the global '{module}.{name}', which is not a plain "
                "container or numpy array type (weights pickles need nothing else)") from None


def restricted_pickle_load(fileobj) -> Any:
    """Unpickle with :class:`RestrictedUnpickler` (latin-1 for Python 2 pickles, as Detectron2 does)."""
    return RestrictedUnpickler(fileobj, encoding="latin1").load()


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
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafePickleError(
                f"'{path}' contains objects that torch.load(weights_only=True) refuses to load (arbitrary "
                f"Python objects are never unpickled here). Re-save only the weights, e.g. "
                f"torch.save({{'model': state_dict}}, path), in an environment you trust. Details: {e}") from e
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


# ----------------------------------------------------------------------------------- name mapping
def convert_basic_c2_names(keys: List[str]) -> List[str]:
    """Caffe2 backbone names -> Detectron2 names, with the same rewriting rules as Detectron2's
    c2 loader (``res2_0_branch2a_bn_s`` -> ``res2.0.conv1.norm.weight``, ``conv1_w`` ->
    ``stem.conv1.weight``, ``res_conv1_bn_b`` -> ``stem.conv1.norm.bias``, ``branch1`` -> ``shortcut``)."""
    rules = [
        (r"_", "."), (r"\.b$", ".bias"), (r"\.w$", ".weight"),
        (r"bn\.s$", "norm.weight"), (r"bn\.bias$", "norm.bias"), (r"bn\.rm", "norm.running_mean"),
        (r"bn\.running\.mean$", "norm.running_mean"), (r"bn\.riv$", "norm.running_var"),
        (r"bn\.running\.var$", "norm.running_var"), (r"bn\.gamma$", "norm.weight"), (r"bn\.beta$", "norm.bias"),
        (r"gn\.s$", "norm.weight"), (r"gn\.bias$", "norm.bias"),
        (r"^res\.conv1\.norm\.", "conv1.norm."), (r"^conv1\.", "stem.conv1."),
        (r"\.branch1\.", ".shortcut."), (r"\.branch2a\.", ".conv1."), (r"\.branch2b\.", ".conv2."),
        (r"\.branch2c\.", ".conv3."),
    ]
    out = []
    for k in keys:
        k = {"pred_b": "linear_b", "pred_w": "linear_w"}.get(k, k)
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out.append(k)
    return out


_TV_BN = re.compile(r"^layer(\d)\.(\d+)\.bn(\d)\.(.+)$")
_TV_CONV = re.compile(r"^layer(\d)\.(\d+)\.conv(\d)\.weight$")
_TV_DOWN = re.compile(r"^layer(\d)\.(\d+)\.downsample\.([01])\.(.+)$")


def is_torchvision_resnet(keys) -> bool:
    keys = set(keys)
    return "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys)


def convert_torchvision_resnet_name(key: str) -> str | None:
    """torchvision ResNet name -> Detectron2 backbone name (without prefix); ``None`` for ``fc.*``."""
    if key.startswith("fc."):
        return None
    if key == "conv1.weight":
        return "stem.conv1.weight"
    if key.startswith("bn1."):
        return "stem.conv1.norm." + key[len("bn1."):]
    m = _TV_CONV.match(key)
    if m:
        return f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"
    m = _TV_BN.match(key)
    if m:
        return f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"
    m = _TV_DOWN.match(key)
    if m:
        suffix = "weight" if m[3] == "0" else "norm." + m[4]
        return f"res{int(m[1]) + 1}.{m[2]}.shortcut.{suffix}"
    return key


def map_checkpoint_keys(state: Dict[str, Tensor], model_keys, fmt: str = "detectron2") -> Tuple[Dict[str, Tensor], List[str]]:
    """Rename checkpoint entries to the model's key names.

    Returns the renamed dict and the list of original keys deliberately ignored (classifier
    ``fc.*``/``linear.*`` of ImageNet backbones).
    """
    model_keys = set(model_keys)
    keys = list(state)
    if fmt == "caffe2":
        keys = convert_basic_c2_names(keys)
    elif is_torchvision_resnet(keys):
        keys = [convert_torchvision_resnet_name(k) for k in keys]
    out: Dict[str, Tensor] = {}
    ignored: List[str] = []
    for original, key in zip(state, keys):
        if key is None or (key.startswith("linear.") and key not in model_keys):
            ignored.append(original)
            continue
        if key.startswith("module.") and key not in model_keys:
            key = key[len("module."):]
        if key not in model_keys and BACKBONE_PREFIX + key in model_keys:
            key = BACKBONE_PREFIX + key
        out[key] = state[original]
    return out, ignored


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


def load_weights(model: nn.Module, path: str, skip_mismatch: bool = False) -> LoadResult:
    """Load the weights file ``path`` into ``model`` (in place, non-strict) and report what happened.

    Args:
        model: any module whose state-dict keys use Detectron2's names (our detector, a backbone, ...).
        path: local ``.pth``/``.pkl`` (see the module docstring); URLs raise ``ValueError``.
        skip_mismatch: leave parameters whose checkpoint shape differs from the model's at their
            initial value (e.g. a predictor trained with another ``num_classes``) instead of raising.

    Raises:
        ValueError: on a shape mismatch (naming the key and both shapes) unless ``skip_mismatch``.
        UnsafePickleError: when a ``.pkl`` references a non-allow-listed global.

    Missing keys ignore BatchNorm's ``num_batches_tracked``; checkpoint ``num_batches_tracked``
    entries without a model counterpart (FrozenBN) are dropped silently.
    """
    ckpt = read_checkpoint(path)
    shapes = _model_state_shapes(model)
    state, ignored = map_checkpoint_keys(ckpt["model"], shapes, ckpt["format"])
    result = LoadResult(ignored_keys=ignored, author=ckpt["__author__"])
    to_load: Dict[str, Tensor] = {}
    for key, value in state.items():
        if key not in shapes:
            if not key.endswith("num_batches_tracked"):
                result.unexpected_keys.append(key)
            continue
        if tuple(value.shape) != shapes[key]:
            if not skip_mismatch:
                raise ValueError(f"shape mismatch for '{key}': checkpoint {tuple(value.shape)} vs model {shapes[key]} "
                                 f"(in '{path}'); pass skip_mismatch=True to keep the model's initial value")
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


def _summarise(keys: List[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


# ------------------------------------------------------------------------------------------- saving
def _cpu_state(model: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(model: nn.Module, path: str, **extra: Any) -> None:
    """Save ``{"model": state_dict, **extra}`` with ``torch.save`` (Detectron2's ``.pth`` layout; extra
    entries must be weights_only-loadable: tensors, numbers, strings, containers). Written to a
    temporary file then renamed, so an interrupted save never leaves a truncated checkpoint."""
    payload = {"model": _cpu_state(model), **extra}
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def export_detectron2(model: nn.Module, path: str) -> None:
    """Write the model's weights for Detectron2: ``.pkl`` -> ``{"model": {name: ndarray},
    "__author__": "cutler", "matching_heuristics": False}`` (Detectron2 model-zoo pickle layout);
    anything else -> ``torch.save({"model": state_dict, "__author__": "cutler"})``. Our key names are
    Detectron2's, so no renaming is needed; the non-persistent buffers (pixel mean/std, anchors) are
    not written, as in Detectron2."""
    state = _cpu_state(model)
    tmp = f"{path}.tmp"
    if str(path).endswith(".pkl"):
        payload = {"model": {k: v.numpy() for k, v in state.items()}, "__author__": "cutler",
                   "matching_heuristics": False}
        with open(tmp, "wb") as f:
            pickle.dump(payload, f, protocol=4)
    else:
        torch.save({"model": state, "__author__": "cutler"}, tmp)
    os.replace(tmp, path)


__all__ = ["LoadResult", "RestrictedUnpickler", "UnsafePickleError", "convert_basic_c2_names",
           "convert_torchvision_resnet_name", "export_detectron2", "load_weights", "map_checkpoint_keys",
           "read_checkpoint", "restricted_pickle_load", "save_checkpoint"]
