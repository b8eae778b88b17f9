#!/usr/bin/env python
"""Submit tools/train_net.py to SLURM through submitit (one task per GPU, env:// rendezvous).

    python scripts/submit_train_slurm.py --nodes 2 --gpus-per-node 8 --partition P --time 4320 \
        --job-dir /checkpoint/$USER/cutler_r0 -- --config-file configs/cutler/imagenet_cascade_r0.yaml

Everything after ``--`` goes to tools/train_net.py. Each task sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT from submitit's job environment, so cutler.engine.launch joins the rendezvous as
under torchrun. A preempted or timed-out job is requeued with ``--resume`` (exact continuation from the
last checkpoint in output_dir).
"""
import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--cpus-per-task", type=int, default=10)
    p.add_argument("--mem-gb", type=int, default=0, help="0: let SLURM decide")
    p.add_argument("--partition", default="")
    p.add_argument("--time", type=int, default=4320, help="minutes")
    p.add_argument("--job-dir", default="slurm_jobs/%j")
    p.add_argument("--job-name", default="cutler_train")
    p.add_argument("--port", type=int, default=29500)
    args = p.parse_args(own)
    args.train_args = train_args
    return args


class Task:
    """The callable submitit runs in every task (picklable, requeues itself with --resume)."""

    def __init__(self, train_args, port: int):
        self.train_args, self.port = list(train_args), port

    def __call__(self):
        import submitit

        env = submitit.JobEnvironment()
        os.environ.update({
            "RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks), "LOCAL_RANK": str(env.local_rank),
            "MASTER_ADDR": env.hostnames[0], "MASTER_PORT": str(self.port),
        })
        sys.path.insert(0, str(ROOT / "tools"))
        import train_net

        train_net.main(self.train_args)

    def checkpoint(self):
        import submitit

        args = self.train_args if "--resume" in self.train_args else self.train_args + ["--resume"]
        return submitit.helpers.DelayedSubmission(Task(args, self.port))


def main(argv=None):
    args = parse_args(argv)
    try:
        import submitit
    except ImportError:
        sys.exit("scripts/submit_train_slurm.py needs submitit: pip install 'cutler[slurm]' (or pip install submitit)")
    executor = submitit.AutoExecutor(folder=args.job_dir, slurm_max_num_timeout=20)
    params = dict(nodes=args.nodes, tasks_per_node=args.gpus_per_node, gpus_per_node=args.gpus_per_node,
                  cpus_per_task=args.cpus_per_task, timeout_min=args.time, name=args.job_name)
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    if args.partition:
        params["slurm_partition"] = args.partition
    executor.update_parameters(**params)
    job = executor.submit(Task(args.train_args, args.port))
    print(f"submitted job {job.job_id}; logs in {args.job_dir}")


if __name__ == "__main__":
    main()
