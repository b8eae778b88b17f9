#!/usr/bin/env python
"""Submit MaskCut as a SLURM job array through submitit: one shard per array task.

Every task runs ``maskcut/maskcut.py`` with ``--shard-index i --num-shards n`` plus the arguments given
after ``--``; tasks are resumable (rerun the same command to finish what a pre-empted task left).
With ``--wait`` the script waits for the array and merges the shards into one COCO JSON.

Example::

    python scripts/submit_maskcut_slurm.py --num-shards 64 --partition gpu --timeout-min 240 --wait -- \\
        --dataset-path /data/imagenet/train --pretrain_path dino_vitbase8_pretrain.pth \\
        --out-dir /scratch/maskcut_in1k --batch-size 16
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def run_shard(shard_index: int, num_shards: int, maskcut_args: Sequence[str]) -> dict:
    """Array task body: one MaskCut shard (runs on the compute node)."""
    sys.path.insert(0, REPO)
    from cutler.maskcut.cli import main

    return main(list(maskcut_args) + ["--shard-index", str(shard_index), "--num-shards", str(num_shards),
                                      "--no-progress", "--no-merge"])


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    maskcut_args: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, maskcut_args = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-shards", type=int, required=True, help="array size = number of shards")
    p.add_argument("--partition", default=None)
    p.add_argument("--gpus-per-task", type=int, default=1)
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--mem-gb", type=int, default=64)
    p.add_argument("--timeout-min", type=int, default=240)
    p.add_argument("--max-parallel", type=int, default=0, help="array tasks running at once (0 = all)")
    p.add_argument("--log-dir", default="output/maskcut_slurm_logs")
    p.add_argument("--wait", action="store_true", help="wait for the array, then merge the shards")
    p.add_argument("--cluster", default="slurm", choices=["slurm", "local", "debug"],
                   help="submitit backend; 'local' runs the tasks as processes here (testing only)")
    args = p.parse_args(argv)
    try:
        import submitit
    except ImportError:
        sys.exit("submit_maskcut_slurm.py needs submitit: pip install submitit (or pip install 'cutler[slurm]'). "
                 "Without SLURM, run maskcut/maskcut.py with --shard-index/--num-shards or under torchrun.")
    try:
        ex = submitit.AutoExecutor(folder=args.log_dir, cluster=args.cluster)
    except Exception as e:  # noqa: BLE001 - submitit raises plain errors when sbatch is absent
        sys.exit(f"cannot use the '{args.cluster}' submitit backend here ({e}); is this a SLURM login node?")
    params = dict(timeout_min=args.timeout_min, gpus_per_node=args.gpus_per_task, tasks_per_node=1,
                  cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, name="maskcut")
    if args.partition and args.cluster == "slurm":
        params["slurm_partition"] = args.partition
    if args.max_parallel and args.cluster == "slurm":
        params["slurm_array_parallelism"] = args.max_parallel
    ex.update_parameters(**params)
    n = args.num_shards
    jobs = ex.map_array(run_shard, list(range(n)), [n] * n, [maskcut_args] * n)
    print(f"submitted {len(jobs)} array tasks: job id {jobs[0].job_id.split('_')[0]}; logs in {args.log_dir}")
    if args.wait:
        failed = 0
        for j in jobs:
            try:
                j.result()
            except Exception as e:  # noqa: BLE001 - report every task, then merge what exists
                failed += 1
                print(f"task {j.job_id} failed: {e}", file=sys.stderr)
        from cutler.maskcut.cli import resolve_maskcut_config
        from cutler.maskcut.writer import merge_outputs

        mcfg = resolve_maskcut_config(maskcut_args)
        counts = merge_outputs(mcfg.out_dir, os.path.join(mcfg.out_dir, "merged.json"), output_format=mcfg.output_format)
        print(f"merged: {counts}; {failed} task(s) failed (rerun this command to resume them)")


if __name__ == "__main__":
    main()
