"""MaskCut pseudo-mask generation: DINO features (:mod:`.vit`), batched Normalized Cuts (:mod:`.ncut`),
CRF post-processing (:mod:`.crf`, :mod:`.postprocess`), the batched driver (:mod:`.pipeline`), inputs
(:mod:`.dataset`) and resumable sharded outputs (:mod:`.writer`). Submodules import lazily: ``import
cutler.maskcut.ncut`` does not load timm or pycocotools."""
