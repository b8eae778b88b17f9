"""The structured configuration schema of cutler.

The tree mirrors Detectron2's ``CfgNode`` layout with lower-case names (``MODEL.ROI_HEADS.USE_DROPLOSS``
becomes ``model.roi_heads.use_droploss``), so a CutLER/Detectron2 YAML maps onto it key for key
(see :mod:`cutler.config.detectron2_yaml`). Sections that Detectron2 does not have (``maskcut``,
``selftrain``, ``eval``) are our own. Defaults are Detectron2's defaults unless a comment says otherwise;
the CutLER recipes live in ``configs/``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional


def _list(*values):
    return field(default_factory=lambda: list(values))


# --------------------------------------------------------------------------------------------- model
@dataclass
class BackboneConfig:
    name: str = "build_resnet_fpn_backbone"
    freeze_at: int = 2  # Detectron2 default; CutLER recipes use 0


@dataclass
class ResNetsConfig:
    depth: int = 50
    out_features: List[str] = _list("res2", "res3", "res4", "res5")
    num_groups: int = 1
    width_per_group: int = 64
    norm: str = "FrozenBN"  # "BN" | "SyncBN" | "FrozenBN" | "GN" | ""
    stride_in_1x1: bool = True
    res5_dilation: int = 1
    res2_out_channels: int = 256
    stem_out_channels: int = 64


@dataclass
class FPNConfig:
    in_features: List[str] = _list("res2", "res3", "res4", "res5")
    out_channels: int = 256
    norm: str = ""
    fuse_type: str = "sum"


# Nested lists are typed List[Any]: OmegaConf cannot coerce ints inside List[List[float]].
@dataclass
class AnchorGeneratorConfig:
    name: str = "DefaultAnchorGenerator"
    sizes: List[Any] = field(default_factory=lambda: [[32.0], [64.0], [128.0], [256.0], [512.0]])
    aspect_ratios: List[Any] = field(default_factory=lambda: [[0.5, 1.0, 2.0]])
    angles: List[Any] = field(default_factory=lambda: [[-90.0, 0.0, 90.0]])
    offset: float = 0.0


@dataclass
class RPNConfig:
    head_name: str = "StandardRPNHead"
    in_features: List[str] = _list("p2", "p3", "p4", "p5", "p6")
    boundary_thresh: int = -1
    iou_thresholds: List[float] = _list(0.3, 0.7)
    iou_labels: List[int] = _list(0, -1, 1)
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    bbox_reg_loss_type: str = "smooth_l1"
    bbox_reg_loss_weight: float = 1.0
    bbox_reg_weights: List[float] = _list(1.0, 1.0, 1.0, 1.0)
    smooth_l1_beta: float = 0.0
    loss_weight: float = 1.0
    pre_nms_topk_train: int = 2000  # per FPN level
    pre_nms_topk_test: int = 1000  # per FPN level
    post_nms_topk_train: int = 1000
    post_nms_topk_test: int = 1000
    nms_thresh: float = 0.7
    conv_dims: List[int] = _list(-1)


@dataclass
class ROIHeadsConfig:
    name: str = "StandardROIHeads"  # "StandardROIHeads" | "CascadeROIHeads" (+ CutLER's Custom* aliases)
    num_classes: int = 80
    in_features: List[str] = _list("p2", "p3", "p4", "p5")
    iou_thresholds: List[float] = _list(0.5)
    iou_labels: List[int] = _list(0, 1)
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    score_thresh_test: float = 0.05
    nms_thresh_test: float = 0.5
    proposal_append_gt: bool = True
    use_droploss: bool = False  # CutLER: zero the cls loss of proposals whose predicted box misses all GT
    droploss_iou_thresh: float = 0.0


@dataclass
class ROIBoxHeadConfig:
    name: str = "FastRCNNConvFCHead"
    bbox_reg_loss_type: str = "smooth_l1"
    bbox_reg_loss_weight: float = 1.0
    bbox_reg_weights: List[float] = _list(10.0, 10.0, 5.0, 5.0)
    smooth_l1_beta: float = 0.0
    pooler_resolution: int = 14
    pooler_sampling_ratio: int = 0
    pooler_type: str = "ROIAlignV2"
    num_fc: int = 0
    fc_dim: int = 1024
    num_conv: int = 0
    conv_dim: int = 256
    norm: str = ""
    cls_agnostic_bbox_reg: bool = False
    train_on_pred_boxes: bool = False
    use_fed_loss: bool = False
    use_sigmoid_ce: bool = False


@dataclass
class ROIBoxCascadeHeadConfig:
    bbox_reg_weights: List[Any] = field(
        default_factory=lambda: [[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, 10.0, 10.0], [30.0, 30.0, 15.0, 15.0]]
    )
    ious: List[float] = _list(0.5, 0.6, 0.7)


@dataclass
class ROIMaskHeadConfig:
    name: str = "MaskRCNNConvUpsampleHead"
    pooler_resolution: int = 14
    pooler_sampling_ratio: int = 0
    num_conv: int = 0
    conv_dim: int = 256
    norm: str = ""
    cls_agnostic_mask: bool = False
    pooler_type: str = "ROIAlignV2"


@dataclass
class SemSegHeadConfig:
    """The Panoptic FPN semantic branch (Detectron2's ``MODEL.SEM_SEG_HEAD``); used by ``PanopticFPN``."""

    name: str = "SemSegFPNHead"
    in_features: List[str] = _list("p2", "p3", "p4", "p5")
    ignore_value: int = 255  # target value without loss (void)
    num_classes: int = 54  # Detectron2's COCO: 53 stuff + 1 "thing"; U2Seg: 27 STEGO clusters + 1 = 28
    convs_dim: int = 128
    common_stride: int = 4  # every level is brought to this stride, then the logits are upsampled x4
    norm: str = "GN"
    loss_weight: float = 1.0  # lambda_s (Base-Panoptic-FPN recipes: 0.5)


@dataclass
class PanopticCombineConfig:
    """How instances and semantic output become one panoptic map (Detectron2's defaults)."""

    enabled: bool = True  # kept for Detectron2 YAML compatibility; the combination always runs at inference
    overlap_thresh: float = 0.5  # an instance whose mask is more than this fraction already taken is dropped
    stuff_area_limit: int = 4096  # stuff regions smaller than this (pixels of the output image) are dropped
    instances_confidence_thresh: float = 0.5  # instances scoring below this are not pasted


@dataclass
class PanopticFPNConfig:
    instance_loss_weight: float = 1.0  # lambda_i, on every ROI-head loss (classification, box, mask)
    combine: PanopticCombineConfig = field(default_factory=PanopticCombineConfig)


@dataclass
class ModelConfig:
    meta_architecture: str = "GeneralizedRCNN"  # | "PanopticFPN" (adds model.sem_seg_head) | "ProposalNetwork"
    weights: str = ""  # a local path; URLs are refused (no downloads at run time)
    mask_on: bool = False
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    pixel_mean: List[float] = _list(103.530, 116.280, 123.675)
    pixel_std: List[float] = _list(1.0, 1.0, 1.0)
    channels_last: bool = False
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    resnets: ResNetsConfig = field(default_factory=ResNetsConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    anchor_generator: AnchorGeneratorConfig = field(default_factory=AnchorGeneratorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: ROIHeadsConfig = field(default_factory=ROIHeadsConfig)
    roi_box_head: ROIBoxHeadConfig = field(default_factory=ROIBoxHeadConfig)
    roi_box_cascade_head: ROIBoxCascadeHeadConfig = field(default_factory=ROIBoxCascadeHeadConfig)
    roi_mask_head: ROIMaskHeadConfig = field(default_factory=ROIMaskHeadConfig)
    sem_seg_head: SemSegHeadConfig = field(default_factory=SemSegHeadConfig)
    panoptic_fpn: PanopticFPNConfig = field(default_factory=PanopticFPNConfig)


# ---------------------------------------------------------------------------------------------- data
@dataclass
class InputConfig:
    min_size_train: List[int] = _list(800)
    min_size_train_sampling: str = "choice"
    max_size_train: int = 1333
    min_size_test: int = 800
    max_size_test: int = 1333
    random_flip: str = "horizontal"
    # The channel order the weights expect (the model always receives RGB and flips for "BGR"). "BGR" pairs
    # with the default model.pixel_mean, which is Detectron2's BGR-ordered mean; RGB recipes set both.
    format: str = "BGR"
    mask_format: str = "bitmask"


@dataclass
class DatasetsConfig:
    train: List[str] = _list("synthetic_train")
    test: List[str] = _list("synthetic_val")
    root: str = "${oc.env:CUTLER_DATASETS,datasets}"  # one root for every registered dataset


@dataclass
class DataLoaderConfig:
    num_workers: int = 4
    aspect_ratio_grouping: bool = True
    sampler_train: str = "TrainingSampler"
    filter_empty_annotations: bool = True
    copy_paste: bool = False
    copy_paste_rate: float = 0.0
    copy_paste_min_ratio: float = 0.5
    copy_paste_max_ratio: float = 1.0
    copy_paste_random_num: bool = True
    visualize_copy_paste: bool = False
    max_instances_per_image: int = 0  # ours: train on at most this many annotations per image, drawn at random (0 = all)


# -------------------------------------------------------------------------------------------- solver
@dataclass
class ClipGradientsConfig:
    enabled: bool = False
    clip_type: str = "value"  # "value" | "norm" (per parameter), as Detectron2 | "full_model" (global norm, ours)
    clip_value: float = 1.0
    norm_type: float = 2.0


@dataclass
class AMPConfig:
    enabled: bool = False
    dtype: str = "float16"  # "float16" | "bfloat16"


@dataclass
class SolverConfig:
    lr_scheduler_name: str = "WarmupMultiStepLR"  # | "WarmupCosineLR"
    max_iter: int = 40000
    base_lr: float = 0.001
    base_lr_end: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0001
    weight_decay_norm: float = 0.0
    weight_decay_bias: Optional[float] = None
    gamma: float = 0.1
    steps: List[int] = _list(30000)
    warmup_factor: float = 0.001
    warmup_iters: int = 1000
    warmup_method: str = "linear"
    checkpoint_period: int = 5000
    checkpoint_keep_last: int = 3  # ours: how many periodic checkpoints to keep
    ims_per_batch: int = 16
    reference_world_size: int = 0
    bias_lr_factor: float = 1.0
    base_lr_multiplier: float = 1.0  # CutLER: LR factor for parameters named below
    base_lr_multiplier_names: List[str] = _list()
    clip_gradients: ClipGradientsConfig = field(default_factory=ClipGradientsConfig)
    amp: AMPConfig = field(default_factory=AMPConfig)
    nan_policy: str = "stop"  # ours: "stop" (keep the last good checkpoint and exit) | "skip" (skip the step)
    log_period: int = 20  # ours: iterations between console / metrics.jsonl / TensorBoard lines
    ddp_find_unused_parameters: bool = False  # ours: DistributedDataParallel(find_unused_parameters=...)


# ---------------------------------------------------------------------------------------------- test
@dataclass
class PreciseBNConfig:
    enabled: bool = False
    num_iter: int = 200


@dataclass
class TestConfig:
    eval_period: int = 0
    detections_per_image: int = 100
    no_segm: bool = False
    precise_bn: PreciseBNConfig = field(default_factory=PreciseBNConfig)


# ------------------------------------------------------------------------------------------- maskcut
@dataclass
class MaskCutConfig:
    """MaskCut pseudo-mask generation (docs/maskcut.md; differences from the published script: docs/deviations.md)."""

    vit_arch: str = "base"  # "small" | "base"
    vit_feat: str = "k"  # "k" | "q" | "v" | "kqv"
    patch_size: int = 8
    pretrain_path: str = ""  # DINO checkpoint; empty = random init (loud warning)
    tau: float = 0.15  # affinity threshold; published ImageNet recipe 0.15 (paper code default 0.2)
    eps: float = 1e-5
    fixed_size: int = 480
    n: int = 3  # masks (NCut stages) per image
    min_area_fraction: float = 0.01  # stage t >= 2 masks covering <= this fraction are dropped
    stage_iou_thresh: float = 0.5  # stage t >= 2 masks overlapping the previous one more are dropped
    crf: str = "auto"  # "pydensecrf" | "torch" | "none" | "auto" (torch on GPU, pydensecrf on CPU)
    crf_iou_thresh: float = 0.5  # masks whose CRF output overlaps the input less are discarded
    solver: str = "fast"  # "fast" (batched iterative, float32/64) | "exact" (float64 dense eigh)
    solver_dtype: str = "float64"  # fast solver precision: "float64" | "float32" (float32 changes later stages)
    solver_tol: float = 1e-9  # fast solver residual tolerance (||S|| = 1)
    gap_tol: float = 1e-7  # lambda3 - lambda2 below this: the cut is undefined, the stage mask is empty
    # "default": deterministic sign/tie conventions | "published": the published script's scipy path and
    # rounding, op for op (float32 ViT under dtype=auto; solver, solver_* and gap_tol unused)
    compat: str = "default"
    output_format: str = "default"  # merged JSON: "default" | "published" (adds per-annotation width/height, int area)
    batch_size: int = 8
    num_workers: int = 4  # image decoding workers
    crf_workers: int = 0  # CRF process pool size; 0 = number of CPU cores
    torch_threads: int = 0  # main-process torch intra-op threads; 0 = leave torch's default (1 helps busy CPU nodes)
    dtype: str = "auto"  # ViT autocast: "auto" (bf16 on GPU, float32 on CPU) | "bfloat16" | "float16" | "float32"
    device: str = "auto"
    dataset_path: str = ""  # empty = the embedded synthetic dataset
    image_root: str = ""  # with a COCO JSON dataset_path: the folder its file names are relative to
    out_dir: str = "output/maskcut"
    chunk_size: int = 256  # images per atomically written result chunk
    shard_index: int = -1  # -1 = from torchrun's RANK (or 0)
    num_shards: int = -1  # -1 = from torchrun's WORLD_SIZE (or 1)
    num_folder_per_job: int = 0  # published ImageNet job split (0 = off)
    job_index: int = 0


# ------------------------------------------------------------------------------------ self-training
@dataclass
class SelfTrainConfig:
    rounds: int = 3
    score_thresholds: List[float] = _list(0.7, 0.7, 0.7)  # one per round (paper text lowers it per round)
    drop_iou_thresh: float = 0.5  # previous pseudo-masks overlapping a kept prediction more are dropped


@dataclass
class EvalConfig:
    datasets: List[str] = _list(
        "coco_2017_val", "coco20k", "voc07_trainval", "lvis_val", "uvo_val", "clipart", "comic",
        "watercolor", "kitti_trainval", "objects365_val", "openimages_val",
    )
    max_dets: int = 100
    batch_size: int = 2
    chunk_size: int = 500  # images per atomically committed result chunk (what a killed run can lose)
    resume: bool = True  # rerun skips images already in committed chunks
    corloc_datasets: List[str] = _list("voc07_trainval", "voc12_trainval", "coco20k")  # single-object discovery


@dataclass
class U2SegConfig:
    """U2Seg (semantic-aware instances): instance embeddings, K-means pseudo-classes, same-cluster copy-paste,
    many-to-one matched evaluation. Defaults are the published instance setting (see ``docs/u2seg.md``)."""

    num_clusters: int = 800  # C: published 300, 800 (main), 2911
    # Instance embeddings: "cls" = DINO CLS token of the instance's box crop (published); "keys" = mean of the
    # last block's patch keys under the mask (one ViT pass per image instead of one per instance).
    feature: str = "cls"
    vit_arch: str = "base"
    patch_size: int = 8
    pretrain_path: str = ""  # DINO ViT checkpoint; empty = random init (loud warning)
    crop_size: int = 480  # "cls": shortest side resized to this, then centre-cropped square (published)
    image_size: int = 480  # "keys": the whole image resized to this square (MaskCut's fixed_size)
    batch_size: int = 64  # ViT inputs per forward (crops for "cls", images for "keys")
    num_workers: int = 4  # image decoding / cropping workers
    dtype: str = "auto"  # ViT autocast: "auto" (bf16 on GPU, float32 on CPU) | "bfloat16" | "float16" | "float32"
    device: str = "auto"
    chunk_size: int = 1000  # images per atomically written embedding chunk (what a killed run can lose)
    shard_index: int = -1  # -1 = from torchrun's RANK (or 0)
    num_shards: int = -1  # -1 = from torchrun's WORLD_SIZE (or 1)
    min_score: float = 0.0  # instances from a predictions file: keep those scoring at least this
    # K-means (Lloyd, Euclidean on the L2-normalised embeddings, random data points as initial centroids).
    backend: str = "auto"  # "torch" (batched, any device) | "faiss" | "sklearn" | "auto" (torch on GPU, else faiss)
    seed: int = 0
    max_iter: int = 100  # published: 100 iterations; stops earlier once no assignment changes
    max_points_per_centroid: int = 0  # faiss: train on a sample of this many points per centroid (0 = all)
    # Same-cluster copy-paste: "any" = CutLER's batch pairing, "same_cluster" = U2Seg's pairing.
    copy_paste_pairing: str = "any"
    # Many-to-one matching of cluster ids to dataset categories (evaluation). Negative = the published value
    # for the dataset and cluster count (COCO 800: IoU 0.6, conf 0.4).
    match_conf: float = -1.0
    match_iou: float = -1.0
    match_iou_type: str = "bbox"  # "bbox" | "segm": the IoU that casts the votes


@dataclass
class StegoConfig:
    """STEGO stuff labels for U2Seg panoptic pseudo-labels: a head on frozen DINO patch features, trained with
    the feature-correspondence loss, a k-means cluster probe, dense CRF. Defaults: STEGO's COCO-Stuff setting
    (``docs/u2seg.md``)."""

    vit_arch: str = "base"  # the published U2Seg stuff labels come from STEGO's ViT-B/8 COCO-Stuff model
    patch_size: int = 8
    pretrain_path: str = ""  # DINO ViT checkpoint; empty = random init (loud warning)
    dtype: str = "auto"  # ViT autocast: "auto" (bf16 on GPU, float32 on CPU) | "bfloat16" | "float16" | "float32"
    device: str = "auto"
    dim: int = 90  # code channels (STEGO: 70 with ViT-S, 90 with ViT-B)
    dropout: float = 0.1
    num_clusters: int = 27  # stuff clusters S (the cluster probe's k)
    # training data: every image gives five crops (4 corners + centre, crop_ratio of each side) or its centre
    crop: str = "five"  # "five" | "center"
    crop_ratio: float = 0.5
    res: int = 224  # training crops are resized to res x res
    num_neighbors: int = 7  # K: a view's partner is one of its K nearest views by global DINO feature
    batch_size: int = 16
    max_steps: int = 7000
    lr: float = 5.0e-4  # Adam
    # loss: one shift and weight per pair type (self / K nearest neighbours / random images)
    self_shift: float = 0.34
    knn_shift: float = 0.04
    random_shift: float = 0.86
    self_weight: float = 0.29
    knn_weight: float = 0.80
    random_weight: float = 0.72
    feature_samples: int = 11
    neg_samples: int = 5
    pointwise: bool = True
    zero_clamp: bool = True
    # cluster probe: spherical k-means on the codes of sampled pixels
    probe_images: int = 2000
    probe_pixels_per_image: int = 100
    probe_iters: int = 50
    # inference
    infer_size: int = 448  # images are resized to this square for the ViT and the CRF, labels resized back
    alpha: float = 2.0  # cluster probabilities: softmax(alpha * cosine)
    flip: bool = True  # average the code of the image and of its mirror
    crf: str = "auto"  # "torch" | "pydensecrf" | "none" | "auto" (torch on GPU, pydensecrf on CPU)
    infer_batch_size: int = 8
    num_workers: int = 4
    shard_index: int = -1  # -1 = from torchrun's RANK (or 0)
    num_shards: int = -1  # -1 = from torchrun's WORLD_SIZE (or 1)
    dataset_path: str = ""  # image folder or COCO JSON
    image_root: str = ""  # with a COCO JSON: the folder its file names are relative to
    out_dir: str = "output/stego"
    checkpoint_period: int = 500
    log_period: int = 20
    seed: int = 0


@dataclass
class PanopticLabelConfig:
    """Panoptic pseudo-labels (things from clustered instances, stuff from STEGO) and panoptic evaluation."""

    max_stuff_thing_overlap: float = 1.0  # void a stuff cluster with more of its pixels under things (published 0.7)
    # evaluation set of the panoptic pipeline (empty with the embedded synthetic run: its own val split)
    benchmark: str = "synthetic"  # "coco" | "cityscapes" | "synthetic": which published rows the report shows
    gt_json: str = ""  # COCO panoptic JSON (datasets/README.md, "Panoptic benchmarks")
    gt_dir: str = ""  # its PNG folder
    image_root: str = ""  # the images its file names are relative to
    semantic_gt_dir: str = ""  # optional <stem>.png semantic maps (255 = void) for PixelAcc / mIoU
    match_conf: float = 0.4  # thing matching (published COCO, 800 clusters: conf 0.4, IoU 0.6)
    match_iou: float = 0.6


@dataclass
class PipelineConfig:
    """The one-command pipeline (``tools/run_pipeline.py``): MaskCut -> round 0 -> self-training -> evaluation."""

    run_dir: str = "output/pipeline"
    train_images: str = ""  # image folder or COCO JSON to discover objects in; "" = the synthetic train split
    train_image_root: str = ""  # with a COCO JSON: the folder its file names are relative to
    eval_datasets: List[str] = _list("synthetic_val")  # catalog names evaluated after every round
    num_synthetic_train: int = 24  # embedded default: synthetic images to train on
    num_synthetic_val: int = 8  # embedded default: held-out synthetic images
    maskcut_config: str = "maskcut/tiny.yaml"  # a config file (name under configs/ or path) for the MaskCut stage
    maskcut_overrides: List[str] = _list()
    detector_config: str = "tiny/synthetic_cascade.yaml"  # the round-0 recipe
    detector_overrides: List[str] = _list()  # applied to every round
    # Self-training rounds change the round-0 recipe as the paper does (no DropLoss, copy-paste U(0.5, 1),
    # init from the previous round, constant LR); add overrides (e.g. a lower LR) here.
    selftrain_overrides: List[str] = _list("model.roi_heads.use_droploss=false", "dataloader.copy_paste_min_ratio=0.5",
                                          "solver.gamma=1.0")
    selftrain_max_iter: int = 0  # iterations per self-training round; 0 = the recipe's max_iter
    num_overlays: int = 4  # held-out images drawn with each round's detections
    overlay_score_thresh: float = 0.5
    num_gpus: int = 1  # training processes on this machine (CPU processes without CUDA)
    variant: str = "cutler"  # "cutler" | "u2seg" (adds embeddings + clustering, class-aware rounds, matched eval)
    # | "u2seg_panoptic" (clustered things + STEGO stuff -> panoptic pseudo-labels -> universal model -> PQ)
    # | "unsam" (divide-and-conquer hierarchical pseudo-masks -> whole-image segmenter rounds -> mask AR)


# -------------------------------------------------------------------------------------------- unsam
@dataclass
class UnsamDivideConfig:
    """UnSAM divide step: a trained detector on the image resized to a square."""

    detector_config: str = "cutler/imagenet_cascade_demo.yaml"  # the detector's config (name under configs/ or path)
    detector_overrides: List[str] = _list()
    weights: str = ""  # trained detector (ours or the published CutLER .pth); the pipeline trains one when empty
    image_size: int = 1024  # the image is resized to image_size x image_size
    score_thresh: float = 0.3  # detector masks scoring more are divide masks
    batch_size: int = 1  # images per detector call


@dataclass
class UnsamConquerConfig:
    """UnSAM conquer step: DINO keys of each divide mask's box, bottom-up merging of adjacent clusters."""

    vit_arch: str = "base"
    patch_size: int = 8
    pretrain_path: str = ""  # DINO checkpoint; empty = random init (loud warning)
    dtype: str = "auto"  # ViT autocast, as maskcut.dtype
    crop_size: int = 256  # each box is resized to crop_size x crop_size (32x32 patches of 8 px)
    thresholds: List[float] = _list(0.6, 0.5, 0.4, 0.3, 0.2, 0.1)  # finest first
    min_patches: int = 4  # smaller clusters are not parts (published code)
    min_coverage: float = 0.9  # a part is kept when more than this fraction of it lies inside its divide mask
    vit_batch_size: int = 32  # crops per ViT forward
    merge_batch_size: int = 64  # crops merged together (Gram memory: 8 MB per 32x32 crop)


@dataclass
class UnsamMergeConfig:
    """UnSAM merge step: mask NMS, dense-CRF refinement of each mask around its box, filtering."""

    nms_iou: float = 0.9  # masks overlapping an earlier (coarser, then larger) kept mask more are duplicates
    crf: str = "auto"  # "pydensecrf" | "torch" | "none" | "auto" (torch on GPU, pydensecrf on CPU)
    crf_size: int = 256  # the refinement window is resized to crf_size x crf_size
    crf_context: float = 2.0  # window side = crf_context x the box's longer side, centred on the box
    crf_iou_thresh: float = 0.5  # masks whose refinement overlaps them less are dropped
    max_area_fraction: float = 0.9  # refined masks covering more of the image are dropped (published code)
    workers: int = 0  # CPU post-processing processes (0 = CPU count, -1 = inline)


@dataclass
class UnsamLearnConfig:
    """The whole-image segmenter trained on the pseudo-masks, and its self-training rounds."""

    segmenter: str = "cascade_mask_rcnn"  # a name of cutler.unsam.segmenter.SEGMENTERS
    config: str = "unsam/cascade_r50_fpn.yaml"
    overrides: List[str] = _list()
    selftrain_rounds: int = 1
    selftrain_score_thresh: float = 0.7  # predictions scoring at least this become labels (CutLER merge rule)
    selftrain_drop_iou: float = 0.5  # previous labels overlapping a kept prediction more are dropped
    selftrain_overrides: List[str] = _list("solver.base_lr=0.005", "solver.gamma=1.0")
    selftrain_max_iter: int = 0  # 0 = the recipe's max_iter


@dataclass
class UnsamConfig:
    """UnSAM divide-and-conquer pseudo-masks (``tools/unsam_divide_conquer.py``) and the pipeline variant."""

    divide: UnsamDivideConfig = field(default_factory=UnsamDivideConfig)
    conquer: UnsamConquerConfig = field(default_factory=UnsamConquerConfig)
    merge: UnsamMergeConfig = field(default_factory=UnsamMergeConfig)
    learn: UnsamLearnConfig = field(default_factory=UnsamLearnConfig)
    device: str = "auto"
    dataset_path: str = ""  # image folder or COCO JSON (tools/unsam_divide_conquer.py)
    image_root: str = ""  # with a COCO JSON dataset_path: the folder its file names are relative to
    out_dir: str = "output/unsam"
    chunk_size: int = 64  # images per atomically written result chunk
    num_workers: int = 2  # image decoding workers
    shard_index: int = -1  # -1 = from torchrun's RANK (or 0)
    num_shards: int = -1  # -1 = from torchrun's WORLD_SIZE (or 1)
    max_dets: int = 1000  # detections per image kept for AR (evaluation)


@dataclass
class CutlerConfig:
    """Root of the configuration tree."""

    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    datasets: DatasetsConfig = field(default_factory=DatasetsConfig)
    dataloader: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    test: TestConfig = field(default_factory=TestConfig)
    maskcut: MaskCutConfig = field(default_factory=MaskCutConfig)
    selftrain: SelfTrainConfig = field(default_factory=SelfTrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    u2seg: U2SegConfig = field(default_factory=U2SegConfig)
    stego: StegoConfig = field(default_factory=StegoConfig)
    panoptic: PanopticLabelConfig = field(default_factory=PanopticLabelConfig)
    unsam: UnsamConfig = field(default_factory=UnsamConfig)
    output_dir: str = "output"
    seed: int = -1  # -1 = derive from time (logged); >= 0 = deterministic
    cudnn_benchmark: bool = False
    vis_period: int = 0
