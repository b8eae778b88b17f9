"""The detector: backbone, RPN, ROI heads, meta-architecture, weights I/O."""
from .build import build_model
from .checkpoint import export_detectron2, load_weights, save_checkpoint

__all__ = ["build_model", "export_detectron2", "load_weights", "save_checkpoint"]
