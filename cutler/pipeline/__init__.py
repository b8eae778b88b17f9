"""The one-command pipeline: MaskCut -> round 0 -> self-training rounds -> zero-shot evaluation."""
from .stages import Manifest, Stage, describe_plan, run_stages

__all__ = ["Manifest", "Stage", "describe_plan", "run_stages"]
