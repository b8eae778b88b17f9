"""Optimizer groups, LR schedules (against hand-computed numbers), clipping, Precise BN."""
import math

import pytest
import torch
from torch import nn

from cutler.config import load_config
from cutler.solver import (build_gradient_clipper, build_lr_scheduler, build_optimizer, get_param_groups,
                           load_lr_scheduler_state, update_bn_stats, warmup_lr_scheduler)


def _opt(lr=0.1):
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(sched, n):
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0])
        sched.optimizer.step()  # no gradients: only the order torch's schedulers expect
        sched.step()
    return out


def test_warmup_multistep_hand_computed():
    s = warmup_lr_scheduler(_opt(0.01), "WarmupMultiStepLR", max_iter=10, steps=[5, 8], gamma=0.1,
                            warmup_iters=4, warmup_factor=0.001)
    assert isinstance(s, torch.optim.lr_scheduler.LambdaLR)
    expected = [0.01 * (0.001 * (1 - i / 4) + i / 4) for i in range(4)] + [0.01, 0.001, 0.001, 0.001, 0.0001, 0.0001]
    # it=0: 1e-5; it=1: 0.01*0.25075; it=4: warmup over; it=5: first step; it=8: second step.
    assert _lrs(s, 10) == pytest.approx(expected, rel=1e-12)
    assert expected[0] == pytest.approx(1e-5) and expected[1] == pytest.approx(0.0025075)


def test_cutler_recipe_values():
    cfg = load_config(None, ["solver.base_lr=0.01", "solver.steps=[80000]", "solver.gamma=0.02",
                             "solver.max_iter=160000", "solver.warmup_iters=1000", "solver.warmup_factor=0.001"])
    s = build_lr_scheduler(cfg, _opt(0.01))
    for it, lr in [(0, 1e-5), (500, 0.01 * (0.001 * 0.5 + 0.5)), (999, 0.01 * (0.001 * 0.001 + 0.999)),
                   (1000, 0.01), (79999, 0.01), (80000, 0.0002), (159999, 0.0002)]:
        assert s.lr_lambdas[0](it) * 0.01 == pytest.approx(lr, rel=1e-12), it


def test_cosine_hand_computed_and_state_roundtrip(tmp_path):
    s = warmup_lr_scheduler(_opt(1.0), "WarmupCosineLR", max_iter=8, base_lr=1.0, base_lr_end=0.2, warmup_iters=0)
    lrs = _lrs(s, 5)
    torch.save(s.state_dict(), tmp_path / "s.pth")
    lrs += _lrs(s, 4)
    assert lrs[0] == pytest.approx(1.0) and lrs[4] == pytest.approx(0.2 + 0.8 * 0.5) and lrs[8] == pytest.approx(0.2)
    assert lrs[2] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))
    # torch's state (weights_only-loadable) and the {"iter": n} state of older checkpoints both restore it.
    for state in (torch.load(tmp_path / "s.pth", weights_only=True), {"iter": 4}):
        opt = _opt(1.0)
        s2 = warmup_lr_scheduler(opt, "WarmupCosineLR", max_iter=8, base_lr=1.0, base_lr_end=0.2)
        load_lr_scheduler_state(s2, state)
        at = s2.last_epoch
        assert opt.param_groups[0]["lr"] == lrs[at] and _lrs(s2, 9 - at) == lrs[at:]


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_param_groups_norm_decay_bias_and_name_multiplier():
    cfg = load_config(None, ["solver.base_lr=0.04", "solver.weight_decay=1e-4", "solver.weight_decay_norm=0.0",
                             "solver.base_lr_multiplier=4.0", "solver.base_lr_multiplier_names=[head]",
                             "solver.bias_lr_factor=2.0"])
    net = _Net()
    opt = build_optimizer(cfg, net)
    setting = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert setting[id(net.backbone[0].weight)] == (0.04, 1e-4)
    assert setting[id(net.backbone[0].bias)] == (0.08, 1e-4)
    assert setting[id(net.backbone[1].weight)] == (0.04, 0.0)  # norm: no decay
    assert setting[id(net.backbone[1].bias)] == (0.08, 0.0)
    assert setting[id(net.head.weight)] == (0.16, 1e-4)  # x4 multiplier by name
    assert setting[id(net.head.bias)] == (0.32, 1e-4)
    assert id(net.frozen.weight) not in setting
    assert opt.defaults["momentum"] == 0.9


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))  # held by "block" itself
        self.fc = nn.Linear(2, 2)  # held by "block.fc"


class _Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(4, 2))  # "head" is a parent: its parameters live in "head.0"
        self.head_extra = nn.Linear(2, 2)  # "head" is a string prefix of this module's name
        self.block = _Block()
        self.pred = nn.Linear(2, 1)


def _lrs_by_param(model, names):
    groups = get_param_groups(model, base_lr=0.25, weight_decay=0.0, lr_multiplier=4.0, lr_multiplier_names=names)
    return {id(p): g["lr"] for g in groups for p in g["params"]}


def test_lr_multiplier_names_match_exact_module_names_as_cutler(caplog):
    # CutLER's get_default_optimizer_params: `if module_name in base_lr_multiplier_names`, for the
    # parameters each module holds itself (named_parameters(recurse=False)).
    net = _Nested()
    with caplog.at_level("WARNING", logger="cutler.solver.build"):
        lr = _lrs_by_param(net, ["head", "block", "pred", "pred.weight"])
    assert lr[id(net.head[0].weight)] == 0.25 and lr[id(net.head[0].bias)] == 0.25  # parent name: no multiplier
    assert lr[id(net.head_extra.weight)] == 0.25  # a name prefix is not a match
    assert lr[id(net.block.scale)] == 1.0 and lr[id(net.block.fc.weight)] == 0.25
    assert lr[id(net.pred.weight)] == 1.0 and lr[id(net.pred.bias)] == 1.0
    # "pred.weight" names a parameter, not a module: no effect, and a warning names it.
    assert "pred.weight" in caplog.text and "'head'" not in caplog.text
    # Inside a DataParallel wrapper ("module." prefix) the same names give the same learning rates.
    wrapped = _lrs_by_param(nn.DataParallel(net), ["head", "block", "pred"])
    assert wrapped == lr


def test_gradient_clipping_kinds():
    def grads():
        a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
        a.grad, b.grad = torch.tensor([3.0, -4.0]), torch.tensor([12.0])
        return a, b

    base = ["solver.clip_gradients.enabled=true", "solver.clip_gradients.clip_value=1.0"]
    a, b = grads()
    build_gradient_clipper(load_config(None, base + ["solver.clip_gradients.clip_type=full_model"]))([a, b])
    assert torch.allclose(torch.cat([a.grad, b.grad]), torch.tensor([3.0, -4.0, 12.0]) / 13.0)  # global norm 13
    a, b = grads()
    build_gradient_clipper(load_config(None, base + ["solver.clip_gradients.clip_type=norm"]))([a, b])
    assert torch.allclose(a.grad, torch.tensor([0.6, -0.8])) and torch.allclose(b.grad, torch.tensor([1.0]))
    a, b = grads()
    build_gradient_clipper(load_config(None, base + ["solver.clip_gradients.clip_type=value"]))([a, b])
    assert a.grad.tolist() == [1.0, -1.0] and b.grad.tolist() == [1.0]
    assert build_gradient_clipper(load_config(None, [])) is None


def test_precise_bn_gives_population_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3, momentum=0.1)
    batches = [torch.randn(8, 3) * 2 + torch.tensor([1.0, -2.0, 5.0]) for _ in range(5)]
    used = update_bn_stats(bn, batches, num_iter=5)
    assert used == 5 and bn.momentum == 0.1
    means = torch.stack([b.mean(0) for b in batches])
    variances = torch.stack([b.var(0, unbiased=True) for b in batches])
    assert torch.allclose(bn.running_mean, means.mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, variances.mean(0), atol=1e-5)
    # An EMA with momentum 0.1 over 5 batches is far from it: Precise BN changed something real.
    ema = nn.BatchNorm1d(3, momentum=0.1)
    for b in batches:
        ema(b)
    assert not torch.allclose(ema.running_mean, bn.running_mean, atol=0.1)
