"""scripts/submit_train_slurm.py: argument split, per-task environment, requeue with --resume."""
import importlib.util
import os
import sys
import types
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "submit_train_slurm.py"


def _load():
    spec = importlib.util.spec_from_file_location("submit_train_slurm", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_args_env_and_requeue(monkeypatch):
    mod = _load()
    args = mod.parse_args(["--nodes", "2", "--gpus-per-node", "4", "--port", "1234", "--",
                           "--config-file", "c.yaml", "solver.max_iter=10"])
    assert (args.nodes, args.gpus_per_node, args.train_args) == (2, 4, ["--config-file", "c.yaml", "solver.max_iter=10"])

    env = types.SimpleNamespace(global_rank=5, num_tasks=8, local_rank=1, hostnames=["node-a", "node-b"])
    seen = {}
    fake_submitit = types.SimpleNamespace(
        JobEnvironment=lambda: env,
        helpers=types.SimpleNamespace(DelayedSubmission=lambda task: task))
    fake_train_net = types.SimpleNamespace(main=lambda argv: seen.update(argv=argv, env={
        k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}))
    monkeypatch.setitem(sys.modules, "submitit", fake_submitit)
    monkeypatch.setitem(sys.modules, "train_net", fake_train_net)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "unset")  # recorded, so the task's writes are undone after the test
    task = mod.Task(args.train_args, args.port)
    task()
    assert seen["argv"] == args.train_args
    assert seen["env"] == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node-a",
                           "MASTER_PORT": "1234"}
    requeued = task.checkpoint()
    assert requeued.train_args == args.train_args + ["--resume"]
    assert requeued.checkpoint().train_args.count("--resume") == 1
