"""Meta-architectures: how backbone, proposal generator and heads are wired together."""
from .rcnn import GeneralizedRCNN, ProposalNetwork, pad_and_stack, rescale_boxes

__all__ = ["GeneralizedRCNN", "ProposalNetwork", "pad_and_stack", "rescale_boxes"]
