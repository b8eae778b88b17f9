"""The detector: backbone, RPN, ROI heads, meta-architecture (weights I/O is :mod:`cutler.checkpoint`)."""
from .build import build_model, build_model_with_weights

__all__ = ["build_model", "build_model_with_weights"]
