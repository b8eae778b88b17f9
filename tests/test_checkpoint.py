"""Weights I/O: restricted unpickling, Detectron2/Caffe2/torchvision key mapping, round trips, errors."""
import io
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision

from cutler.config import load_config
from cutler.modeling import build_model
from cutler.checkpoint import (UnsafePickleError, convert_basic_c2_names, export_detectron2, load_weights,
                               read_checkpoint, restricted_pickle_load, save_checkpoint)

OVERRIDES = ["model.meta_architecture=ProposalNetwork", "model.device=cpu", "model.resnets.norm=FrozenBN",
             "model.resnets.stride_in_1x1=false", "model.backbone.freeze_at=0"]


def _model(seed, *extra):
    torch.manual_seed(seed)
    model = build_model(load_config(None, OVERRIDES + list(extra)))
    # Random statistics so that a buffer that fails to load is noticed.
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith(("running_mean", "weight", "bias")):
                buf.uniform_(-1, 1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2)
    return model


@pytest.fixture(scope="module")
def source():
    return _model(1)


@pytest.fixture
def target():
    return _model(2)


def _assert_same_state(a, b, prefix=""):
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k.startswith(prefix)]
    assert keys
    for k in keys:
        assert torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------ restricted pickle
class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path, target):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": _Evil(marker)}, "__author__": "x"}, f)
    with pytest.raises(UnsafePickleError, match=r"'(posix|os)\.system'"):
        load_weights(target, str(path))
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        restricted_pickle_load(io.BytesIO(pickle.dumps(eval)))  # a bare reference is refused too


def test_pth_with_arbitrary_objects_is_refused(tmp_path, target):
    marker = tmp_path / "pwned_pth"
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "trainer": _Evil(marker)}, path)
    with pytest.raises(UnsafePickleError, match="weights_only"):
        load_weights(target, str(path))
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_pickles_load_with_every_protocol(protocol):
    data = {"model": {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float64(2.5),
                      "i": np.array(3, dtype=np.int64)}, "__author__": "t"}
    out = restricted_pickle_load(io.BytesIO(pickle.dumps(data, protocol=protocol)))
    np.testing.assert_array_equal(out["model"]["a"], data["model"]["a"])
    assert out["model"]["s"] == 2.5 and out["model"]["i"] == 3


def test_urls_are_refused(target):
    for url in ("https://dl.fbaipublicfiles.com/cutler/checkpoints/cutler_cascade_final.pth",
                "detectron2://ImageNetPretrained/MSRA/R-50.pkl"):
        with pytest.raises(ValueError, match="URL.*does not download"):
            load_weights(target, url)
    with pytest.raises(FileNotFoundError):
        load_weights(target, "/nonexistent/model_final.pth")


# ------------------------------------------------------------------------------------ round trips
def test_save_and_load_round_trip(tmp_path, source, target):
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint(source, path, iteration=7)
    result = load_weights(target, path)
    assert result.missing_keys == [] and result.unexpected_keys == [] and result.skipped_mismatched == []
    _assert_same_state(source, target)
    assert read_checkpoint(path)["extra"]["iteration"] == 7


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_export_detectron2_round_trip(tmp_path, source, target, suffix):
    path = str(tmp_path / f"model_final{suffix}")
    export_detectron2(source, path)
    if suffix == ".pkl":  # Detectron2 model-zoo layout: numpy arrays under "model", an author
        with open(path, "rb") as f:
            raw = restricted_pickle_load(f)
        assert raw["__author__"] == "cutler" and isinstance(raw["model"]["backbone.fpn_lateral2.weight"], np.ndarray)
    else:
        raw = torch.load(path, weights_only=True)
    assert set(raw["model"]) == set(source.state_dict())
    assert "pixel_mean" not in raw["model"]  # non-persistent, as in Detectron2
    result = load_weights(target, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    _assert_same_state(source, target)


def test_detectron2_pth_with_bn_counters_loads_into_frozen_bn(tmp_path, source, target):
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["backbone.bottom_up.stem.conv1.norm.num_batches_tracked"] = torch.tensor(100)
    path = str(tmp_path / "d2.pth")
    torch.save({"model": state, "iteration": 3}, path)
    result = load_weights(target, path)
    assert result.unexpected_keys == [] and result.missing_keys == []
    _assert_same_state(source, target)


# ------------------------------------------------------------------------------------ key mapping
def _c2_name(key):
    """Detectron2 backbone name -> Caffe2 name (the inverse of Detectron2's c2 conversion)."""
    norm = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}
    parts = key.split(".")
    if parts[0] == "stem":
        return "conv1_w" if parts[-1] == "weight" and parts[-2] == "conv1" else f"res_conv1_bn_{norm[parts[-1]]}"
    stage, block, conv = parts[0], parts[1], parts[2]
    branch = {"shortcut": "branch1", "conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c"}[conv]
    if parts[3] == "norm":
        return f"{stage}_{block}_{branch}_bn_{norm[parts[4]]}"
    return f"{stage}_{block}_{branch}_w"


def test_convert_basic_c2_names():
    assert convert_basic_c2_names(["conv1_w", "res_conv1_bn_s", "res_conv1_bn_b", "res2_0_branch1_w",
                                   "res2_0_branch2a_bn_s", "res4_5_branch2c_bn_riv", "pred_w"]) == [
        "stem.conv1.weight", "stem.conv1.norm.weight", "stem.conv1.norm.bias", "res2.0.shortcut.weight",
        "res2.0.conv1.norm.weight", "res4.5.conv3.norm.running_var", "linear.weight"]


def test_caffe2_pickle_loads_into_backbone(tmp_path, source, target):
    prefix = "backbone.bottom_up."
    blobs = {_c2_name(k[len(prefix):]): v.numpy() for k, v in source.state_dict().items() if k.startswith(prefix)}
    blobs["res2_0_branch2a_w_momentum"] = np.zeros(1, np.float32)  # dropped, as Detectron2 does
    blobs["pred_w"] = np.zeros((1000, 2048), np.float32)  # ImageNet classifier: ignored
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f, protocol=2)
    result = load_weights(target, str(path))
    _assert_same_state(source, target, prefix)
    assert result.unexpected_keys == [] and result.ignored_keys == ["pred_w"] and result.author == "Caffe2"
    assert result.missing_keys and all(not k.startswith(prefix) for k in result.missing_keys)


def test_caffe2_affine_only_bn_gets_detectron2_default_statistics(tmp_path, target):
    # MSRA Caffe2 ResNets store only the folded scale/shift (_bn_s, _bn_b); Detectron2 then uses
    # running_mean 0 and running_var 1 (so the scale is w / sqrt(1 + eps)).
    blobs = {"res_conv1_bn_s": np.full(64, 2.0, np.float32), "res_conv1_bn_b": np.full(64, 0.5, np.float32)}
    path = tmp_path / "affine_only.pkl"
    with open(path, "wb") as f:
        pickle.dump(blobs, f, protocol=2)
    result = load_weights(target, str(path))
    norm = target.backbone.bottom_up.stem.conv1.norm
    assert torch.equal(norm.weight, torch.full((64,), 2.0)) and torch.equal(norm.bias, torch.full((64,), 0.5))
    assert torch.equal(norm.running_mean, torch.zeros(64)) and torch.equal(norm.running_var, torch.ones(64))
    assert "backbone.bottom_up.stem.conv1.norm.running_var" in result.missing_keys  # absent from the file


def test_backbone_only_detectron2_pickle_gets_bottom_up_prefix(tmp_path, source, target):
    prefix = "backbone.bottom_up."
    state = {k[len(prefix):]: v.numpy() for k, v in source.state_dict().items() if k.startswith(prefix)}
    path = tmp_path / "dino_RN50_pretrain_d2_format.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "torchvision", "matching_heuristics": True}, f)
    result = load_weights(target, str(path))
    _assert_same_state(source, target, prefix)
    assert result.unexpected_keys == [] and {k.split(".")[1] for k in result.missing_keys} == {
        "fpn_lateral2", "fpn_lateral3", "fpn_lateral4", "fpn_lateral5", "fpn_output2", "fpn_output3",
        "fpn_output4", "fpn_output5", "rpn_head"}


def test_torchvision_resnet50_state_dict_gives_identical_features(tmp_path, target):
    torch.manual_seed(3)
    tv = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.2, 0.6)
                m.bias.uniform_(-0.1, 0.1)
    path = str(tmp_path / "dino_resnet50_pretrain.pth")
    torch.save(tv.state_dict(), path)
    result = load_weights(target, path)
    assert sorted(result.ignored_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    assert not any(k.startswith("backbone.bottom_up.") for k in result.missing_keys)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = target.backbone.bottom_up.eval()(x)["res5"]
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ mismatches
def test_shape_mismatch_names_the_key_unless_skipped(tmp_path, source, target):
    state = {k: v.clone() for k, v in source.state_dict().items()}
    key = "proposal_generator.rpn_head.objectness_logits.weight"
    state[key] = torch.zeros(5, 256, 1, 1)
    path = str(tmp_path / "other_anchors.pth")
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=r"shape mismatch for 'proposal_generator\.rpn_head\.objectness_logits"
                                         r"\.weight': checkpoint \(5, 256, 1, 1\) vs model \(3, 256, 1, 1\)"):
        load_weights(target, path)
    before = target.state_dict()[key].clone()
    result = load_weights(target, path, strictness="skip_mismatched")
    assert result.skipped_mismatched == [(key, (5, 256, 1, 1), (3, 256, 1, 1))]
    assert key not in result.missing_keys
    assert torch.equal(target.state_dict()[key], before)
    _assert_same_state(source, target, "backbone.")


# ----------------------------------------------------------------------------------- strictness
SMALL = OVERRIDES + ["model.resnets.depth=18", "model.resnets.res2_out_channels=64", "model.fpn.out_channels=32"]


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A small detector and the path of its saved weights."""
    torch.manual_seed(3)
    model = build_model(load_config(None, SMALL))
    path = str(tmp_path_factory.mktemp("small") / "own.pth")
    save_checkpoint(model, path)
    return model, path


def test_exact_strictness_refuses_missing_and_unused_tensors(tmp_path, small_checkpoint):
    source, _ = small_checkpoint
    target = build_model(load_config(None, SMALL))
    state = {k: v.clone() for k, v in source.state_dict().items()}
    dropped = "backbone.fpn_output2.bias"
    extra = state.pop(dropped)
    path = str(tmp_path / "partial.pth")
    torch.save({"model": state}, path)
    assert load_weights(target, path).missing_keys == [dropped]  # "shapes" tolerates it
    with pytest.raises(ValueError, match=rf"partial\.pth.*missing {dropped}; not in the model none"):
        load_weights(target, path, strictness="exact")
    state[dropped], state["roi_heads.unknown.weight"] = extra, torch.zeros(1)
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=r"missing none; not in the model roi_heads\.unknown\.weight"):
        load_weights(target, path, strictness="exact")
    with pytest.raises(ValueError, match="strictness must be one of"):
        load_weights(target, path, strictness="lenient")


def test_build_model_with_weights_loads_every_tensor_or_keeps_the_initialisation(small_checkpoint):
    from cutler.modeling import build_model_with_weights

    source, path = small_checkpoint
    cfg = load_config(None, SMALL)
    _assert_same_state(source, build_model_with_weights(cfg, path, "exact"))
    torch.manual_seed(1)
    fresh = build_model(cfg)
    torch.manual_seed(1)
    unloaded = build_model_with_weights(cfg, "", "exact")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), unloaded.state_dict().values()))
