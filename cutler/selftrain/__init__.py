"""Self-training: turning a round's confident predictions into the next round's labels."""
from .merge import MergeStats, merge_self_training_labels, select_labels

__all__ = ["MergeStats", "merge_self_training_labels", "select_labels"]
