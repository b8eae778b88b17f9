"""Training engine: the loop, metrics, process launching, recipe scaling (checkpoints: :mod:`cutler.checkpoint`).

Pipelines call :func:`train` (one process) or :func:`launch` + :func:`train` (several)."""
from .launch import find_free_port, launch, launched_by_torchrun
from .scaling import auto_scale_workers
from .trainer import NonFiniteLossError, Trainer, train, unwrap

__all__ = ["find_free_port", "launch", "launched_by_torchrun", "auto_scale_workers", "NonFiniteLossError", "Trainer",
           "train", "unwrap"]
