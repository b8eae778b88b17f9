"""The training engine with a tiny detector: loss decreases, checkpoints, NaN policy, exact resume, DDP."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cutler.checkpoint import Checkpointer
from cutler.config import load_config
from cutler.engine import NonFiniteLossError, launch, train
from test_data_fixtures import register_tiny
from test_trainer_fixtures import TinyDetector, child_main, tiny_overrides

HERE = Path(__file__).resolve().parent




@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_ds")
    info = register_tiny(root, "tiny_trainer", num_images=8)
    return {"root": root, "name": "tiny_trainer", **info}


def _cfg(dataset, out, **kw):
    return load_config(None, tiny_overrides(dataset["root"], dataset["name"], out, **kw))


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loss_decreases_and_outputs(dataset, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(dataset, out, max_iter=40, ims_per_batch=4, **{"solver.checkpoint_period": 10,
                                                              "solver.checkpoint_keep_last": 2})
    final = train(cfg, model_builder=lambda c: TinyDetector())
    assert final == out / "model_final.pth" and final.is_file()
    rows = [r for r in _metrics(out) if "total_loss" in r]
    assert [r["iteration"] for r in rows] == list(range(1, 41))
    first = sum(r["total_loss"] for r in rows[:5]) / 5
    last = sum(r["total_loss"] for r in rows[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert rows[0]["lr"] == pytest.approx(0.05 * (0.001 * 0.5 + 0.5))  # after step 1 of a 2-iteration warmup
    assert rows[-1]["lr"] == pytest.approx(0.005)  # after the step at 20
    # Keep-last-2 periodic checkpoints plus the final one; last_checkpoint names the final.
    names = sorted(p.name for p in out.glob("model_*.pth"))
    assert names == ["model_0000019.pth", "model_0000029.pth", "model_final.pth"]
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert (out / "config.yaml").is_file() and list((out / "tensorboard").iterdir())
    ckpt = Checkpointer.load(final)  # weights_only=True
    assert ckpt["iteration"] == 40 and ckpt["sampler"][0]["batch_no"] == 40


def test_nan_stop_names_iteration_and_term(dataset, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"iteration 3: loss_count = nan.*model_0000001\.pth") as e:
        train(_cfg(dataset, out), model_builder=lambda c: TinyDetector(nan_at=3))
    assert e.value.iteration == 3 and e.value.term == "loss_count"
    assert not (out / "model_final.pth").exists()
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"


def test_nan_skip_skips_only_that_update(dataset, tmp_path):
    out = tmp_path / "skip"
    final = train(_cfg(dataset, out, **{"solver.nan_policy": "skip"}), model_builder=lambda c: TinyDetector(nan_at=3))
    rows = {r["iteration"]: r for r in _metrics(out)}
    assert rows[4] == {"iteration": 4, "skipped_step": 1}
    assert all("total_loss" in rows[i] for i in (1, 2, 3, 5, 6))
    state = Checkpointer.load(final)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_resume_from_checkpoint_is_exact_with_workers_copy_paste_and_precise_bn(dataset, tmp_path):
    extra = {"dataloader.num_workers": 2, "dataloader.copy_paste": "true", "dataloader.copy_paste_rate": 1.0,
             "solver.checkpoint_keep_last": 0, "test.precise_bn.enabled": "true", "test.precise_bn.num_iter": 2,
             "test.eval_period": 2}
    full = tmp_path / "full"
    ref = Checkpointer.load(train(_cfg(dataset, full, **extra), model_builder=lambda c: TinyDetector()))
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(full / "model_0000003.pth", part / "model_0000003.pth")  # as if it died after iteration 4
    (part / "last_checkpoint").write_text("model_0000003.pth")
    got = Checkpointer.load(train(_cfg(dataset, part, **extra), resume=True, model_builder=lambda c: TinyDetector()))
    _assert_same_state(ref["model"], got["model"])
    assert ref["sampler"] == got["sampler"]
    rows_full = [r for r in _metrics(full) if r["iteration"] > 4]
    assert [r["total_loss"] for r in _metrics(part)] == [r["total_loss"] for r in rows_full]


def test_resume_from_a_checkpoint_with_the_earlier_scheduler_state_is_exact(dataset, tmp_path):
    """Checkpoints written before the LR schedule was torch's LambdaLR hold ``{"iter": n}`` as scheduler state."""
    extra = {"solver.checkpoint_period": 1, "solver.checkpoint_keep_last": 0}
    full = tmp_path / "full"
    ref = Checkpointer.load(train(_cfg(dataset, full, **extra), model_builder=lambda c: TinyDetector()))
    old = Checkpointer.load(full / "model_0000000.pth")  # after iteration 1 of the 2-iteration warmup
    old["scheduler"] = {"iter": old["scheduler"]["last_epoch"]}
    part = tmp_path / "part"
    part.mkdir()
    torch.save(old, part / "model_0000000.pth")
    (part / "last_checkpoint").write_text("model_0000000.pth")
    got = Checkpointer.load(train(_cfg(dataset, part, **extra), resume=True, model_builder=lambda c: TinyDetector()))
    _assert_same_state(ref["model"], got["model"])
    rows_full = [(r["lr"], r["total_loss"]) for r in _metrics(full) if r["iteration"] > 1]
    assert [(r["lr"], r["total_loss"]) for r in _metrics(part)] == rows_full and len(rows_full) == 5


def test_precise_bn_reads_batches_without_copy_paste(dataset, tmp_path, monkeypatch):
    """Detectron2's PreciseBN hook reads its own training loader and CutLER pastes only in the training
    step: the recomputed statistics must come from un-pasted batches even when training pastes."""
    import itertools

    import cutler.engine.trainer as trainer_mod
    from cutler.data.build import build_train_loader

    cfg = _cfg(dataset, tmp_path / "pbn", **{"dataloader.copy_paste": "true", "dataloader.copy_paste_rate": 1.0,
                                             "test.precise_bn.enabled": "true", "test.precise_bn.num_iter": 2})
    seen = []

    def fake_update_bn_stats(model, data, n):
        seen.extend(itertools.islice(data, n))
        return n

    monkeypatch.setattr(trainer_mod, "update_bn_stats", fake_update_bn_stats)
    trainer = trainer_mod.Trainer(cfg, model_builder=lambda c: TinyDetector())
    assert trainer.precise_bn() == 2
    seed = trainer.seed + trainer_mod.PRECISE_BN_SEED_OFFSET

    def digest(batches):
        return [[(d["image"], d["instances"]["masks"]) for d in b] for b in batches]

    def same(a, b):
        return all(torch.equal(x, y) for ba, bb in zip(a, b) for da, db in zip(ba, bb) for x, y in zip(da, db))

    plain = digest(b["inputs"] for b in itertools.islice(build_train_loader(cfg, seed, copy_paste=False), 2))
    pasted = digest(b["inputs"] for b in itertools.islice(build_train_loader(cfg, seed), 2))
    assert len(seen) == 2 and [len(b) for b in seen] == [len(b) for b in plain] == [2, 2]
    assert same(digest(seen), plain)
    assert not same(pasted, plain)  # the training loader does paste: the check above can fail


def _child(args, log):
    """Run test_trainer_fixtures.child_main in a new interpreter, output to the file ``log``."""
    cmd = [sys.executable, str(HERE / "test_trainer_fixtures.py"), *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)


def test_sigkill_mid_run_then_resume_is_bit_identical(dataset, tmp_path):
    args = [dataset["image_root"], dataset["json_file"]]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    victim = _child(args + [run_dir, 10, 0, 0.15], tmp_path / "victim.log")  # slow: still running after 2 checkpoints
    procs = [victim]
    try:
        child_main([str(a) for a in args + [ref_dir, 10, 0, 0.0]])  # the uninterrupted reference, in this process
        deadline = time.time() + 120
        while not (run_dir / "model_0000003.pth").exists():
            assert victim.poll() is None and time.time() < deadline, (tmp_path / "victim.log").read_text()
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
        assert victim.returncode == -signal.SIGKILL
        assert not (run_dir / "model_final.pth").exists()
        procs.append(_child(args + [run_dir, 10, 1, 0.0], tmp_path / "resumed.log"))
        assert procs[-1].wait(120) == 0, (tmp_path / "resumed.log").read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    a, b = Checkpointer.load(ref_dir / "model_final.pth"), Checkpointer.load(run_dir / "model_final.pth")
    _assert_same_state(a["model"], b["model"])
    for (ka, va), (kb, vb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert torch.equal(va["momentum_buffer"], vb["momentum_buffer"])
    assert a["sampler"] == b["sampler"] and a["iteration"] == b["iteration"] == 10
    # The log of the killed-and-resumed run is the uninterrupted one: lines after the checkpoint were redone.
    losses = [[(r["iteration"], r["total_loss"]) for r in _metrics(d)] for d in (ref_dir, run_dir)]
    assert losses[0] == losses[1] and [i for i, _ in losses[0]] == list(range(1, 11))


def _ddp_main(dataset_args, out, ims):
    torch.set_num_threads(1)
    from cutler.data.catalog import register_dataset

    root, name, image_root, json_file = dataset_args
    register_dataset(name, image_root, json_file, overwrite=True)
    cfg = load_config(None, tiny_overrides(root, name, out, max_iter=2, ims_per_batch=ims,
                                           **{"solver.warmup_iters": 0, "dataloader.aspect_ratio_grouping": "false"}))
    return train(cfg, model_builder=lambda c: TinyDetector())


def test_ddp_two_processes_match_one_process_on_the_same_global_batch(dataset, tmp_path):
    dargs = (str(dataset["root"]), dataset["name"], str(dataset["image_root"]), str(dataset["json_file"]))
    torch.manual_seed(0)
    init = TinyDetector().state_dict()
    launch(_ddp_main, num_gpus_per_machine=1, args=(dargs, tmp_path / "one", 4))
    launch(_ddp_main, num_gpus_per_machine=2, args=(dargs, tmp_path / "two", 4), backend="gloo")
    one = Checkpointer.load(tmp_path / "one" / "model_final.pth")
    two = Checkpointer.load(tmp_path / "two" / "model_final.pth")
    assert two["world_size"] == 2 and len(two["sampler"]) == 2
    moved = 0.0
    for k, v in one["model"].items():
        if k.startswith("norm.running") or k.endswith("num_batches_tracked"):
            continue  # BN buffers: each DDP process keeps its own
        assert torch.allclose(v, two["model"][k], atol=1e-6, rtol=1e-5), k
        moved = max(moved, (v - init[k]).abs().max().item())
    assert moved > 1e-3  # the updates are real, far above the tolerance


def test_auto_scale_workers_hand_computed():
    from cutler.engine import auto_scale_workers

    cfg = load_config(None, ["solver.ims_per_batch=16", "solver.base_lr=0.01", "solver.max_iter=160000",
                             "solver.steps=[80000]", "solver.warmup_iters=1000", "solver.checkpoint_period=5000",
                             "test.eval_period=10000", "solver.reference_world_size=8"])
    s = auto_scale_workers(cfg, 2)
    assert (s.solver.ims_per_batch, s.solver.max_iter, list(s.solver.steps), s.solver.warmup_iters) == (4, 640000, [320000], 4000)
    assert s.solver.base_lr == pytest.approx(0.0025)
    assert (s.solver.checkpoint_period, s.test.eval_period) == (20000, 40000)
    assert auto_scale_workers(cfg, 8) is cfg
    assert auto_scale_workers(load_config(None, []), 2).solver.ims_per_batch == 16  # reference 0: unchanged


def test_bf16_autocast_on_cpu_and_eval_hook(dataset, tmp_path):
    calls = []

    def evaluate(model, cfg):
        assert not model.training
        calls.append(model.box.weight.detach().clone())
        return {"fake/AP": float(len(calls))}

    out = tmp_path / "bf16"
    train(_cfg(dataset, out, max_iter=4, **{"solver.amp.enabled": "true", "solver.amp.dtype": "bfloat16",
                                            "test.eval_period": 2}),
          evaluate=evaluate, model_builder=lambda c: TinyDetector())
    rows = _metrics(out)
    assert [r["iteration"] for r in rows if "fake/AP" in r] == [2, 4]
    assert all(math.isfinite(r["total_loss"]) for r in rows if "total_loss" in r)
    assert not torch.equal(calls[0], calls[1])  # evaluated at two different points of training
