"""Training engine: the loop, checkpoints, metrics, process launching, recipe scaling.

Pipelines call :func:`train` (one process) or :func:`launch` + :func:`train` (several)."""
from .checkpointer import Checkpointer, capture_rng_state, restore_rng_state
from .launch import find_free_port, launch, launched_by_torchrun
from .scaling import auto_scale_workers
from .trainer import NonFiniteLossError, Trainer, default_model_builder, train, unwrap

__all__ = ["Checkpointer", "capture_rng_state", "restore_rng_state", "find_free_port", "launch", "launched_by_torchrun",
           "auto_scale_workers", "NonFiniteLossError", "Trainer", "default_model_builder", "train", "unwrap"]
