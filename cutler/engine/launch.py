"""Starting one or many training processes.

- ``torchrun`` (single or multi-node): the environment holds ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
  ``MASTER_ADDR``/``MASTER_PORT``; :func:`launch` joins the ``env://`` rendezvous and runs the function.
- ``--num-gpus N [--num-machines M --machine-rank R --dist-url URL]``: :func:`launch` spawns ``N`` local
  processes (``torch.multiprocessing.spawn``); with one machine and ``dist_url="auto"`` it picks a free
  local port. Without CUDA the processes use the gloo backend on the CPU (for tests and debugging).
- SLURM: ``scripts/submit_train_slurm.py`` (submitit) starts one task per GPU with the same variables.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cutler.utils.logging import get_logger

logger = get_logger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)


def find_free_port() -> int:
    """A TCP port free on this machine right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def launched_by_torchrun() -> bool:
    """True when torchrun (or SLURM through our submitter) set up the environment of this process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def _init_process_group(backend: str, local_rank: int, timeout: timedelta, init_method: str = "env://",
                        world_size: int = -1, rank: int = -1) -> None:
    """Join the process group (``-1``: world size and rank from the environment), pinning this rank to its GPU
    under NCCL."""
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method=init_method, world_size=world_size, rank=rank, timeout=timeout)


def init_distributed_from_env(timeout_minutes: float = 180.0) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE > 1``) for work that is not :func:`launch`\\ ed
    (evaluation tools), pinning this rank to its GPU; NCCL on CUDA, else Gloo.

    The long timeout covers rank 0 evaluating a large benchmark (Objects365) while the other ranks already wait
    at the next dataset's barrier. Returns whether a group is active.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    _init_process_group(default_backend(), int(os.environ.get("LOCAL_RANK", "0")), timedelta(minutes=timeout_minutes))
    return True


def _init_and_run(main_func: Callable, args: Sequence[Any], backend: str, init_method: str, world_size: int,
                  rank: int, local_rank: int, timeout: timedelta):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank)})
    _init_process_group(backend, local_rank, timeout, init_method, world_size, rank)
    try:
        dist.barrier()
        return main_func(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawned_worker(local_rank: int, main_func: Callable, args: Sequence[Any], backend: str, dist_url: str,
                    world_size: int, num_per_machine: int, machine_rank: int, timeout: timedelta):
    _init_and_run(main_func, args, backend, dist_url, world_size, machine_rank * num_per_machine + local_rank,
                  local_rank, timeout)


def launch(main_func: Callable, num_gpus_per_machine: int = 1, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = "auto", args: Sequence[Any] = (), backend: str | None = None,
           timeout: timedelta = DEFAULT_TIMEOUT):
    """Run ``main_func(*args)`` in every process of the job.

    Args:
        main_func: the per-process entry point (picklable: a module-level function).
        num_gpus_per_machine: processes per machine (GPUs; CPU processes without CUDA).
        num_machines, machine_rank: the multi-node layout; ``dist_url`` must then be ``tcp://host:port`` of
            machine 0.
        dist_url: ``"auto"`` (one machine: a free local port) or a ``tcp://`` / ``file://`` URL.
        backend: ``"nccl"`` / ``"gloo"``; default nccl with CUDA, else gloo.

    Returns:
        ``main_func``'s result when it ran in this process (torchrun or a single process), else None.
    """
    backend = backend or default_backend()
    if launched_by_torchrun() and not dist.is_initialized():
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if world == 1:
            return main_func(*args)
        return _init_and_run(main_func, args, backend, "env://", world, rank, local, timeout)
    world_size = num_gpus_per_machine * num_machines
    if world_size <= 1:
        return main_func(*args)
    if backend == "nccl" and num_gpus_per_machine > torch.cuda.device_count():
        raise ValueError(f"--num-gpus {num_gpus_per_machine} but only {torch.cuda.device_count()} CUDA devices are visible")
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url='auto' only works on one machine; pass --dist-url tcp://<machine 0>:<port>")
        dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    logger.info("spawning %d process(es) (%s, %s)", num_gpus_per_machine, backend, dist_url)
    mp.spawn(_spawned_worker, nprocs=num_gpus_per_machine, join=True,
             args=(main_func, args, backend, dist_url, world_size, num_gpus_per_machine, machine_rank, timeout))
    return None
