"""Proposal generators (Detectron2's RPN)."""
from .rpn import RPN, StandardRPNHead, build_rpn, find_top_rpn_proposals, flatten_predictions

__all__ = ["RPN", "StandardRPNHead", "build_rpn", "find_top_rpn_proposals", "flatten_predictions"]
