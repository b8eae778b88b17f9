"""Checkpoints: weights files in every format users bring (read without running pickled code, names
mapped from Detectron2 / Caffe2 / torchvision, exported for Detectron2) and the training checkpointer
(atomic, keep-last-K, with optimizer, scheduler, RNG and sampler state)."""
from .checkpointer import LAST_CHECKPOINT_FILE, Checkpointer, capture_rng_state, restore_rng_state
from .key_mapping import (BACKBONE_PREFIX, convert_basic_c2_names, convert_torchvision_resnet_name,
                          is_torchvision_resnet, map_checkpoint_keys)
from .safe_pickle import RestrictedUnpickler, UnsafePickleError, restricted_pickle_load
from .weights import (STRICTNESS, LoadResult, export_detectron2, load_weights, read_checkpoint, save_checkpoint,
                      torch_load_weights_only)

__all__ = ["LAST_CHECKPOINT_FILE", "Checkpointer", "capture_rng_state", "restore_rng_state", "BACKBONE_PREFIX",
           "convert_basic_c2_names", "convert_torchvision_resnet_name", "is_torchvision_resnet", "map_checkpoint_keys",
           "RestrictedUnpickler", "UnsafePickleError", "restricted_pickle_load", "STRICTNESS", "LoadResult",
           "export_detectron2", "load_weights", "read_checkpoint", "save_checkpoint", "torch_load_weights_only"]
