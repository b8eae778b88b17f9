"""U2Seg: semantic-aware instances (pseudo-classes for CutLER's masks), STEGO stuff labels and panoptic segmentation.

:mod:`.embeddings` (one DINO feature per instance, streamed and sharded), :mod:`.kmeans` (K-means with torch,
faiss or scikit-learn; assignment to saved centroids), :mod:`.labels` (COCO files whose categories are clusters),
:mod:`.copy_paste` (same-cluster copy-paste), :mod:`.matching` and :mod:`.evaluation` (many-to-one matching of
cluster ids to categories, matched metrics, the published rows), :mod:`.pipeline` (the pipeline's U2Seg stages),
:mod:`.stego` / :mod:`.stego_run` (STEGO stuff labels), :mod:`.panoptic` (panoptic pseudo-labels, COCO panoptic format),
:mod:`.panoptic_eval` (PQ / SQ / RQ, Hungarian PixelAcc / mIoU), :mod:`.converters` (panoptic benchmarks),
:mod:`.panoptic_pipeline` (the panoptic loop),
:mod:`.cli` (the tools). Submodules import lazily. See ``docs/u2seg.md``.
"""
