"""UnSAM: hierarchical pseudo-masks by divide-and-conquer, and a whole-image segmenter trained on them.

* :mod:`.merging` - bottom-up iterative merging of adjacent patch clusters, batched over crops, exact;
* :mod:`.hierarchy` - cluster trees from the merged levels, mask NMS with parent bookkeeping;
* :mod:`.divide_conquer` - the pseudo-mask generator (detector -> crops -> DINO keys -> merging -> masks);
* :mod:`.pipeline` - the pipeline variant (pseudo-masks -> segmenter rounds -> evaluation -> report).
"""
