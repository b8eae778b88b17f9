"""ResNet/FPN conventions: Detectron2 key names, FrozenBN semantics, FREEZE_AT, STRIDE_IN_1X1, FPN fusion."""
import math

import pytest
import torch
from torch import nn

from cutler.config import load_config
from cutler.modeling.backbone import FPN, LastLevelMaxPool, build_backbone, build_resnet_backbone
from cutler.modeling.layers import FrozenBatchNorm2d, get_norm
from cutler.modeling.shape_spec import ShapeSpec


def _cfg(*overrides):
    return load_config(None, list(overrides))


@pytest.fixture(scope="module")
def r50_fpn():
    torch.manual_seed(0)
    return build_backbone(_cfg("model.resnets.norm=FrozenBN", "model.backbone.freeze_at=0"))


# ------------------------------------------------------------------------------------------ norms
def test_frozen_bn_equals_batchnorm_in_eval_with_same_stats():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
    frozen = FrozenBatchNorm2d.convert_frozen_batchnorm(bn)
    assert isinstance(frozen, FrozenBatchNorm2d)
    x = torch.randn(2, 6, 5, 7)
    expected = (x - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-5) \
        * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(bn(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frozen(x), expected, rtol=1e-5, atol=1e-5)  # no-grad path (F.batch_norm)
    xg = x.clone().requires_grad_(True)
    out = frozen.train()(xg)  # train mode changes nothing; grad path (folded scale/shift)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    scale = bn.weight / torch.sqrt(bn.running_var + 1e-5)
    torch.testing.assert_close(xg.grad, scale.view(1, -1, 1, 1).expand_as(x).detach(), rtol=1e-5, atol=1e-6)
    assert all(not b.requires_grad for b in frozen.buffers()) and len(list(frozen.parameters())) == 0


def test_frozen_bn_default_is_identity_and_ignores_num_batches_tracked():
    frozen = FrozenBatchNorm2d(3)
    x = torch.randn(1, 3, 2, 2)
    torch.testing.assert_close(frozen(x), x)  # running_var = 1 - eps makes the scale exactly 1
    state = nn.BatchNorm2d(3).state_dict()
    assert "num_batches_tracked" in state
    frozen.load_state_dict(state)  # strict: the BN step counter is dropped, not reported
    assert sorted(frozen.state_dict()) == ["bias", "running_mean", "running_var", "weight"]


def test_get_norm_vocabulary():
    assert get_norm("", 8) is None
    assert type(get_norm("BN", 8)) is nn.BatchNorm2d
    assert type(get_norm("SyncBN", 8)) is nn.SyncBatchNorm
    assert isinstance(get_norm("FrozenBN", 8), FrozenBatchNorm2d)
    gn = get_norm("GN", 64)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 32
    with pytest.raises(ValueError, match="unknown norm 'LayerNormX'"):
        get_norm("LayerNormX", 8)


def test_syncbn_without_distributed_is_batchnorm_on_cpu():
    torch.manual_seed(0)
    sync, bn = nn.SyncBatchNorm(4), nn.BatchNorm2d(4)
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(sync.train()(x), bn.train()(x))
    torch.testing.assert_close(sync.running_mean, bn.running_mean)


# ---------------------------------------------------------------------------------- key names
def test_resnet50_fpn_keys_are_detectron2_names(r50_fpn):
    keys = list(r50_fpn.state_dict())
    prefixed = {"backbone." + k for k in keys}
    published = [
        "backbone.bottom_up.stem.conv1.weight", "backbone.bottom_up.stem.conv1.norm.weight",
        "backbone.bottom_up.stem.conv1.norm.bias", "backbone.bottom_up.stem.conv1.norm.running_mean",
        "backbone.bottom_up.stem.conv1.norm.running_var", "backbone.bottom_up.res2.0.shortcut.weight",
        "backbone.bottom_up.res2.0.shortcut.norm.running_var", "backbone.bottom_up.res2.0.conv1.weight",
        "backbone.bottom_up.res2.0.conv1.norm.weight", "backbone.bottom_up.res2.0.conv2.weight",
        "backbone.bottom_up.res2.0.conv3.norm.bias", "backbone.bottom_up.res4.5.conv3.weight",
        "backbone.bottom_up.res5.2.conv3.norm.running_mean", "backbone.fpn_lateral2.weight",
        "backbone.fpn_lateral2.bias", "backbone.fpn_output2.weight", "backbone.fpn_output5.bias",
        "backbone.fpn_lateral5.weight",
    ]
    assert set(published) <= prefixed
    # stem 5 + 16 blocks x 15 + 4 shortcuts x 5 = 265 bottom-up tensors; FPN 4 levels x 4 = 16.
    assert len(keys) == 281
    assert not any("res2.1.shortcut" in k or "res6" in k or "fpn_lateral6" in k for k in keys)
    assert tuple(r50_fpn.state_dict()["fpn_lateral5.weight"].shape) == (256, 2048, 1, 1)
    assert tuple(r50_fpn.state_dict()["bottom_up.res3.0.shortcut.weight"].shape) == (512, 256, 1, 1)


def test_resnet101_block_counts():
    net = build_resnet_backbone(_cfg("model.resnets.depth=101"))
    assert [len(getattr(net, f"res{i}")) for i in range(2, 6)] == [3, 4, 23, 3]
    with pytest.raises(ValueError, match="depth=26"):
        build_resnet_backbone(_cfg("model.resnets.depth=26"))


def test_resnet18_basic_blocks_names_shapes_and_strides():
    net = build_resnet_backbone(_cfg("model.resnets.depth=18", "model.resnets.res2_out_channels=64"))
    assert [len(getattr(net, f"res{i}")) for i in range(2, 6)] == [2, 2, 2, 2]
    sd = net.state_dict()
    # Detectron2's ResNet-18 keys: no conv3, a shortcut only where channels change (res3..res5).
    assert "res2.0.conv2.norm.running_var" in sd and not any(".conv3." in k for k in sd)
    assert "res2.0.shortcut.weight" not in sd and tuple(sd["res3.0.shortcut.weight"].shape) == (128, 64, 1, 1)
    out = net(torch.zeros(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (1, 64, 16, 24), "res3": (1, 128, 8, 12), "res4": (1, 256, 4, 6), "res5": (1, 512, 2, 3)}
    with pytest.raises(ValueError, match="basic blocks"):
        build_resnet_backbone(_cfg("model.resnets.depth=34", "model.resnets.res5_dilation=2"))


def test_fpn_norm_gives_norm_keys_and_no_bias():
    net = build_backbone(_cfg("model.fpn.norm=GN", "model.resnets.depth=50"))
    keys = set(net.state_dict())
    assert {"fpn_lateral3.weight", "fpn_lateral3.norm.weight", "fpn_output3.norm.bias"} <= keys
    assert "fpn_lateral3.bias" not in keys and "fpn_output3.bias" not in keys


# -------------------------------------------------------------------------------------- shapes
def test_output_shapes_and_strides(r50_fpn):
    shapes = r50_fpn.output_shape()
    assert shapes == {f"p{k}": ShapeSpec(256, 2 ** k) for k in range(2, 7)}
    assert r50_fpn.size_divisibility == 32
    with torch.no_grad():
        out = r50_fpn(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "p2": (1, 256, 16, 24), "p3": (1, 256, 8, 12), "p4": (1, 256, 4, 6), "p5": (1, 256, 2, 3),
        "p6": (1, 256, 1, 2)}


def test_stride_in_1x1():
    on = build_resnet_backbone(_cfg("model.resnets.stride_in_1x1=true"))
    off = build_resnet_backbone(_cfg("model.resnets.stride_in_1x1=false"))
    assert on.res3[0].conv1.stride == (2, 2) and on.res3[0].conv2.stride == (1, 1)
    assert off.res3[0].conv1.stride == (1, 1) and off.res3[0].conv2.stride == (2, 2)
    assert off.res2[0].conv2.stride == (1, 1) and off.res3[0].shortcut.stride == (2, 2)
    assert off.res3[1].conv2.stride == (1, 1)


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 5])
def test_freeze_at(freeze_at):
    net = build_resnet_backbone(_cfg("model.resnets.norm=BN", f"model.backbone.freeze_at={freeze_at}"))
    parts = {"stem": net.stem, **{f"res{i}": getattr(net, f"res{i}") for i in range(2, 6)}}
    frozen_parts = (["stem"] if freeze_at >= 1 else []) + [f"res{i}" for i in range(2, freeze_at + 1)]
    for name, part in parts.items():
        frozen = name in frozen_parts
        assert all(p.requires_grad != frozen for p in part.parameters()), name
        norms = [m for m in part.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
        assert norms and all(isinstance(m, FrozenBatchNorm2d) == frozen for m in norms), name


def test_frozen_stage_statistics_do_not_move_in_train_mode():
    net = build_resnet_backbone(_cfg("model.resnets.norm=BN", "model.backbone.freeze_at=2")).train()
    before = net.res2[0].conv1.norm.running_mean.clone()
    res3_before = net.res3[0].conv1.norm.running_mean.clone()
    net(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(net.res2[0].conv1.norm.running_mean, before)
    assert not torch.equal(net.res3[0].conv1.norm.running_mean, res3_before)


# ------------------------------------------------------------------------------------ FPN fusion
class _FakeBottomUp(nn.Module):
    def __init__(self, feats):
        super().__init__()
        self.feats = feats

    def output_shape(self):
        return {k: ShapeSpec(v.shape[1], 2 ** (int(k[-1]))) for k, v in self.feats.items()}

    def forward(self, x):
        return self.feats


def test_fpn_top_down_sum_nearest_upsampling_and_p6_maxpool():
    # res2..res5 with 1 channel; identity lateral (1x1 weight 1) and output (3x3 centre 1) convs:
    # p5 = c5, p4 = c4 + up2(p5), p3 = c3 + up2(p4), p2 = c2 + up2(p3), p6 = p5[::2, ::2].
    c5 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    c4 = torch.arange(16.0).view(1, 1, 4, 4)
    c3 = torch.zeros(1, 1, 8, 8)
    c2 = torch.ones(1, 1, 16, 16)
    fpn = FPN(_FakeBottomUp({"res2": c2, "res3": c3, "res4": c4, "res5": c5}), ["res2", "res3", "res4", "res5"],
              out_channels=1, top_block=LastLevelMaxPool())
    with torch.no_grad():
        for name, module in fpn.named_children():
            if name.startswith("fpn_"):
                module.weight.zero_()
                module.bias.zero_()
                k = module.weight.shape[-1] // 2
                module.weight[0, 0, k, k] = 1.0
    out = fpn(torch.zeros(1, 3, 64, 64))
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    torch.testing.assert_close(out["p5"], c5)
    expected_p4 = c4 + torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])
    torch.testing.assert_close(out["p4"], expected_p4)
    torch.testing.assert_close(out["p3"][0, 0, ::2, ::2], expected_p4[0, 0])
    torch.testing.assert_close(out["p2"][0, 0, 5, 9], torch.tensor(1.0) + expected_p4[0, 0, 1, 2])
    torch.testing.assert_close(out["p6"], torch.tensor([[[[1.0]]]]))
    assert fpn.output_shape()["p6"].stride == 64 and fpn.size_divisibility == 32
