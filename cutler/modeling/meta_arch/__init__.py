"""Meta-architectures: how backbone, proposal generator and heads are wired together."""
from .panoptic_fpn import PanopticFPN, combine_semantic_and_instance_outputs
from .rcnn import GeneralizedRCNN, ProposalNetwork, pad_and_stack, rescale_boxes

__all__ = ["GeneralizedRCNN", "PanopticFPN", "ProposalNetwork", "combine_semantic_and_instance_outputs",
           "pad_and_stack", "rescale_boxes"]
