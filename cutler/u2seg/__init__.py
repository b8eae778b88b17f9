"""U2Seg: semantic-aware instances, STEGO stuff labels, panoptic pseudo-labels and evaluation."""
