"""Checkpoint key names -> our (Detectron2's) names: Caffe2 blobs, torchvision ResNets, DDP prefixes.

Applied in order by :func:`map_checkpoint_keys`: Caffe2 names (``res2_0_branch2a_w``, ``res_conv1_bn_s``,
``conv1_w``) are converted as Detectron2's c2 loader does; torchvision ResNet names are converted; a
leading ``module.`` (DistributedDataParallel) is stripped; a key absent from the model but present
under the ``backbone.bottom_up.`` prefix (backbone-only Detectron2 pickles such as the converted
DINO/MoCo ResNets) is moved there.
"""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

from torch import Tensor

BACKBONE_PREFIX = "backbone.bottom_up."


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
