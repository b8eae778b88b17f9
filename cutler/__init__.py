"""cutler: unsupervised object detection and instance segmentation in the CutLER family."""

__version__ = "0.1.0"
