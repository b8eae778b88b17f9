"""Configuration: schema, overrides, unknown-key errors, Detectron2 YAML import/export, shipped configs."""
import glob
import os
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from cutler.config import CONFIGS_DIR, ConfigKeyError, load_config
from cutler.config.detectron2_yaml import (CUTLER_ONLY_KEYS, DETECTRON2_DEFAULTS, export_detectron2_yaml,
                                          import_detectron2_yaml)
from cutler.config.schema import CutlerConfig

SHIPPED = sorted(glob.glob(str(CONFIGS_DIR / "**" / "*.yaml"), recursive=True))


def test_defaults_are_detectron2_defaults():
    cfg = load_config()
    assert cfg.model.rpn.iou_thresholds == [0.3, 0.7]
    assert cfg.model.roi_box_cascade_head.ious == [0.5, 0.6, 0.7]
    assert cfg.model.roi_heads.score_thresh_test == 0.05
    assert cfg.solver.base_lr == 0.001


def test_override_changes_value_and_types_are_checked():
    cfg = load_config(None, ["solver.base_lr=0.5", "solver.steps=[10,20]", "model.roi_heads.use_droploss=true"])
    assert cfg.solver.base_lr == 0.5 and list(cfg.solver.steps) == [10, 20] and cfg.model.roi_heads.use_droploss
    with pytest.raises(Exception, match="base_lr"):
        load_config(None, ["solver.base_lr=abc"])


@pytest.mark.parametrize("override, bad, hint", [
    ("solver.bse_lr=1", "solver.bse_lr", "solver.base_lr"),
    ("model.roi_heads.use_drop_loss=true", "model.roi_heads.use_drop_loss", "model.roi_heads.use_droploss"),
    ("maskcut.tua=0.2", "maskcut.tua", "maskcut.tau"),
])
def test_unknown_override_names_key_and_neighbour(override, bad, hint):
    with pytest.raises(ConfigKeyError) as err:
        load_config(None, [override])
    assert f"'{bad}'" in str(err.value) and f"'{hint}'" in str(err.value)


def test_unknown_key_in_file_names_file_and_neighbour(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("solver:\n  max_itr: 10\n")
    with pytest.raises(ConfigKeyError) as err:
        load_config(str(f))
    assert "solver.max_itr" in str(err.value) and "solver.max_iter" in str(err.value) and "bad.yaml" in str(err.value)


def test_adding_keys_is_refused():
    with pytest.raises(ConfigKeyError):
        load_config(None, ["+solver.new_key=1"])


def test_base_inheritance_and_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("solver:\n  base_lr: 0.1\n  max_iter: 5\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\nsolver:\n  max_iter: 7\n")
    cfg = load_config(str(tmp_path / "b.yaml"))
    assert cfg.solver.base_lr == 0.1 and cfg.solver.max_iter == 7
    (tmp_path / "c.yaml").write_text("_base_: d.yaml\n")
    (tmp_path / "d.yaml").write_text("_base_: c.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(str(tmp_path / "c.yaml"))


def test_missing_config_file_is_named():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("nope.yaml")


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.solver.base_lr = 3.0


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.relpath(p, CONFIGS_DIR))
def test_every_shipped_config_loads_and_round_trips_through_detectron2_yaml(path, tmp_path):
    cfg = load_config(path)
    d2 = tmp_path / "exported.yaml"
    d2.write_text(export_detectron2_yaml(cfg))
    assert all(k.isupper() for k in yaml.safe_load(d2.read_text()))
    back = load_config(str(d2))
    for section in ("model", "input", "datasets", "dataloader", "solver", "test"):
        # keys of ours alone (e.g. dataloader.max_instances_per_image) cannot travel through Detectron2's format
        ours_only = {k.split(".", 1)[1] for k in CUTLER_ONLY_KEYS if k.startswith(section + ".") and k.count(".") == 1}
        exported, original = (OmegaConf.to_container(c[section]) for c in (back, cfg))
        assert {k: v for k, v in exported.items() if k not in ours_only} == \
            {k: v for k, v in original.items() if k not in ours_only}, section


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.relpath(p, CONFIGS_DIR))
def test_export_writes_only_keys_detectron2_and_cutler_know(path):
    """Detectron2's merge_from_file rejects unknown keys: an exported YAML may hold only keys of Detectron2's
    config plus CutLER's additions (the literal reference below), and no value Detectron2 cannot parse."""
    cfg = load_config(path)
    exported = _flatten_upper(yaml.safe_load(export_detectron2_yaml(cfg)))
    assert set(exported) <= set(D2_DEFAULTS_REFERENCE), sorted(set(exported) - set(D2_DEFAULTS_REFERENCE))
    assert exported.get("MODEL.DEVICE", "cuda") != "auto"
    assert exported.get("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "value") in ("value", "norm")


def _flatten_upper(data, prefix=""):
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten_upper(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_export_refuses_what_detectron2_cannot_express():
    cfg = load_config("cutler/imagenet_cascade_r0.yaml", ["solver.clip_gradients.clip_type=full_model"])
    with pytest.raises(ValueError, match="full_model"):
        export_detectron2_yaml(cfg)
    assert "DEVICE" not in export_detectron2_yaml(load_config("cutler/imagenet_cascade_r0.yaml", ["model.device=auto"]))
    assert "DEVICE: cpu" in export_detectron2_yaml(load_config("cutler/imagenet_cascade_r0.yaml", ["model.device=cpu"]))


def test_plain_detectron2_export_drops_cutler_keys():
    cfg = load_config("cutler/imagenet_cascade_r0.yaml")
    text = export_detectron2_yaml(cfg, include_cutler_fork_keys=False)
    assert "USE_DROPLOSS" not in text and "COPY_PASTE" not in text and "MASKCUT" not in text
    assert "USE_DROPLOSS: true" in export_detectron2_yaml(cfg)


# Published CutLER recipes in Detectron2's vocabulary, pinned under tests/data/published_configs/ (each file
# names its origin), and the shipped config each one must import to.
PUBLISHED_DIR = Path(__file__).resolve().parent / "data" / "published_configs"
PUBLISHED = {
    "CutLER-ImageNet/cascade_mask_rcnn_R_50_FPN.yaml": "cutler/imagenet_cascade_r0.yaml",
    "CutLER-ImageNet/cascade_mask_rcnn_R_50_FPN_self_train.yaml": "cutler/imagenet_cascade_self_train.yaml",
    "CutLER-ImageNet/mask_rcnn_R_50_FPN.yaml": "cutler/imagenet_mask_rcnn_r0.yaml",
    "COCO-Semisupervised/cascade_mask_rcnn_R_50_FPN_1perc.yaml": "coco_semi/cascade_1perc.yaml",
}
D2_BASE = PUBLISHED_DIR / "Base-RCNN-FPN.yaml"


@pytest.mark.parametrize("published", sorted(PUBLISHED))
def test_published_detectron2_recipe_imports_to_our_shipped_config(published):
    # the published files name checkpoint URLs as weights; cutler takes local paths only
    imported = load_config(str(PUBLISHED_DIR / published), ["model.weights=''"])
    shipped = load_config(PUBLISHED[published])
    for section in ("model", "input", "datasets", "dataloader", "solver", "test"):
        assert OmegaConf.to_container(imported[section]) == OmegaConf.to_container(shipped[section]), section
    assert imported.output_dir == shipped.output_dir


def test_detectron2_unknown_and_unsupported_keys(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("MODEL:\n  ROI_HEADS:\n    USE_DROP_LOSS: True\n")
    with pytest.raises(ConfigKeyError) as err:
        load_config(str(f))
    assert "MODEL.ROI_HEADS.USE_DROP_LOSS" in str(err.value) and "MODEL.ROI_HEADS.USE_DROPLOSS" in str(err.value)
    f.write_text("MODEL:\n  KEYPOINT_ON: True\n")
    with pytest.raises(ConfigKeyError, match="KEYPOINT_ON.*not supported"):
        load_config(str(f))
    f.write_text("MODEL:\n  KEYPOINT_ON: False\n  RETINANET:\n    NUM_CLASSES: 3\n")
    with pytest.raises(ConfigKeyError, match="RETINANET"):
        load_config(str(f))
    f.write_text("MODEL:\n  ROI_HEADS:\n    NAME: RROIHeads\n")
    with pytest.raises(ConfigKeyError, match="RROIHeads"):
        load_config(str(f))


def test_detectron2_import_parses_tuple_strings(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text(D2_FPN_NAMES + "SOLVER:\n  STEPS: (10, 20)\nDATASETS:\n  TRAIN: ('a', 'b')\n")
    data = import_detectron2_yaml(f)
    assert data["solver"]["steps"] == [10, 20] and data["datasets"]["train"] == ["a", "b"]


# Detectron2's defaults (detectron2/config/defaults.py, plus CutLER's add_cutler_config keys) for every key
# our schema maps, as literal values: the reference the importer must reproduce for keys a YAML omits.
D2_DEFAULTS_REFERENCE = {
    "CUDNN_BENCHMARK": False, "DATALOADER.ASPECT_RATIO_GROUPING": True, "DATALOADER.COPY_PASTE": False,
    "DATALOADER.COPY_PASTE_MAX_RATIO": 1.0, "DATALOADER.COPY_PASTE_MIN_RATIO": 0.5,
    "DATALOADER.COPY_PASTE_RANDOM_NUM": True, "DATALOADER.COPY_PASTE_RATE": 0.0,
    "DATALOADER.FILTER_EMPTY_ANNOTATIONS": True, "DATALOADER.NUM_WORKERS": 4,
    "DATALOADER.SAMPLER_TRAIN": 'TrainingSampler', "DATALOADER.VISUALIZE_COPY_PASTE": False, "DATASETS.TEST": [],
    "DATASETS.TRAIN": [], "INPUT.FORMAT": 'BGR', "INPUT.MASK_FORMAT": 'polygon', "INPUT.MAX_SIZE_TEST": 1333,
    "INPUT.MAX_SIZE_TRAIN": 1333, "INPUT.MIN_SIZE_TEST": 800, "INPUT.MIN_SIZE_TRAIN": [800],
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": 'choice', "INPUT.RANDOM_FLIP": 'horizontal',
    "MODEL.ANCHOR_GENERATOR.ANGLES": [[-90, 0, 90]], "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
    "MODEL.ANCHOR_GENERATOR.NAME": 'DefaultAnchorGenerator', "MODEL.ANCHOR_GENERATOR.OFFSET": 0.0,
    "MODEL.ANCHOR_GENERATOR.SIZES": [[32, 64, 128, 256, 512]], "MODEL.BACKBONE.FREEZE_AT": 2,
    "MODEL.BACKBONE.NAME": 'build_resnet_backbone', "MODEL.DEVICE": 'cuda', "MODEL.FPN.FUSE_TYPE": 'sum',
    "MODEL.FPN.IN_FEATURES": [], "MODEL.FPN.NORM": '', "MODEL.FPN.OUT_CHANNELS": 256, "MODEL.MASK_ON": False,
    "MODEL.META_ARCHITECTURE": 'GeneralizedRCNN', "MODEL.PIXEL_MEAN": [103.53, 116.28, 123.675],
    "MODEL.PIXEL_STD": [1.0, 1.0, 1.0], "MODEL.RESNETS.DEPTH": 50, "MODEL.RESNETS.NORM": 'FrozenBN',
    "MODEL.RESNETS.NUM_GROUPS": 1, "MODEL.RESNETS.OUT_FEATURES": ['res4'], "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
    "MODEL.RESNETS.RES5_DILATION": 1, "MODEL.RESNETS.STEM_OUT_CHANNELS": 64, "MODEL.RESNETS.STRIDE_IN_1X1": True,
    "MODEL.RESNETS.WIDTH_PER_GROUP": 64,
    "MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS": [[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, 10.0, 10.0],
                                                  [30.0, 30.0, 15.0, 15.0]],
    "MODEL.ROI_BOX_CASCADE_HEAD.IOUS": [0.5, 0.6, 0.7], "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": 'smooth_l1',
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT": 1.0, "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
    "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": False, "MODEL.ROI_BOX_HEAD.CONV_DIM": 256,
    "MODEL.ROI_BOX_HEAD.FC_DIM": 1024, "MODEL.ROI_BOX_HEAD.NAME": '', "MODEL.ROI_BOX_HEAD.NORM": '',
    "MODEL.ROI_BOX_HEAD.NUM_CONV": 0, "MODEL.ROI_BOX_HEAD.NUM_FC": 0, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 14,
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": 0, "MODEL.ROI_BOX_HEAD.POOLER_TYPE": 'ROIAlignV2',
    "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": 0.0, "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES": False,
    "MODEL.ROI_BOX_HEAD.USE_FED_LOSS": False, "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE": False,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 512, "MODEL.ROI_HEADS.DROPLOSS_IOU_THRESH": 0.0,
    "MODEL.ROI_HEADS.IN_FEATURES": ['res4'], "MODEL.ROI_HEADS.IOU_LABELS": [0, 1],
    "MODEL.ROI_HEADS.IOU_THRESHOLDS": [0.5], "MODEL.ROI_HEADS.NAME": 'Res5ROIHeads',
    "MODEL.ROI_HEADS.NMS_THRESH_TEST": 0.5, "MODEL.ROI_HEADS.NUM_CLASSES": 80,
    "MODEL.ROI_HEADS.POSITIVE_FRACTION": 0.25, "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT": True,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.05, "MODEL.ROI_HEADS.USE_DROPLOSS": False,
    "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK": False, "MODEL.ROI_MASK_HEAD.CONV_DIM": 256,
    "MODEL.ROI_MASK_HEAD.NAME": 'MaskRCNNConvUpsampleHead', "MODEL.ROI_MASK_HEAD.NORM": '',
    "MODEL.ROI_MASK_HEAD.NUM_CONV": 0, "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": 14,
    "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO": 0, "MODEL.ROI_MASK_HEAD.POOLER_TYPE": 'ROIAlignV2',
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE": 256, "MODEL.RPN.BBOX_REG_LOSS_TYPE": 'smooth_l1',
    "MODEL.RPN.BBOX_REG_LOSS_WEIGHT": 1.0, "MODEL.RPN.BBOX_REG_WEIGHTS": [1.0, 1.0, 1.0, 1.0],
    "MODEL.RPN.BOUNDARY_THRESH": -1, "MODEL.RPN.CONV_DIMS": [-1], "MODEL.RPN.HEAD_NAME": 'StandardRPNHead',
    "MODEL.RPN.IN_FEATURES": ['res4'], "MODEL.RPN.IOU_LABELS": [0, -1, 1], "MODEL.RPN.IOU_THRESHOLDS": [0.3, 0.7],
    "MODEL.RPN.LOSS_WEIGHT": 1.0, "MODEL.RPN.NMS_THRESH": 0.7, "MODEL.RPN.POSITIVE_FRACTION": 0.5,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 1000, "MODEL.RPN.POST_NMS_TOPK_TRAIN": 2000, "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000,
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 12000, "MODEL.RPN.SMOOTH_L1_BETA": 0.0, "MODEL.WEIGHTS": '',
    "MODEL.SEM_SEG_HEAD.NAME": 'SemSegFPNHead', "MODEL.SEM_SEG_HEAD.IN_FEATURES": ['p2', 'p3', 'p4', 'p5'],
    "MODEL.SEM_SEG_HEAD.IGNORE_VALUE": 255, "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 54, "MODEL.SEM_SEG_HEAD.CONVS_DIM": 128,
    "MODEL.SEM_SEG_HEAD.COMMON_STRIDE": 4, "MODEL.SEM_SEG_HEAD.NORM": 'GN', "MODEL.SEM_SEG_HEAD.LOSS_WEIGHT": 1.0,
    "MODEL.PANOPTIC_FPN.INSTANCE_LOSS_WEIGHT": 1.0, "MODEL.PANOPTIC_FPN.COMBINE.ENABLED": True,
    "MODEL.PANOPTIC_FPN.COMBINE.OVERLAP_THRESH": 0.5, "MODEL.PANOPTIC_FPN.COMBINE.STUFF_AREA_LIMIT": 4096,
    "MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH": 0.5,
    "OUTPUT_DIR": './output', "SEED": -1, "SOLVER.AMP.ENABLED": False, "SOLVER.BASE_LR": 0.001,
    "SOLVER.BASE_LR_END": 0.0, "SOLVER.BASE_LR_MULTIPLIER": 1, "SOLVER.BASE_LR_MULTIPLIER_NAMES": [],
    "SOLVER.BIAS_LR_FACTOR": 1.0, "SOLVER.CHECKPOINT_PERIOD": 5000, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": 'value',
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 1.0, "SOLVER.CLIP_GRADIENTS.ENABLED": False,
    "SOLVER.CLIP_GRADIENTS.NORM_TYPE": 2.0, "SOLVER.GAMMA": 0.1, "SOLVER.IMS_PER_BATCH": 16,
    "SOLVER.LR_SCHEDULER_NAME": 'WarmupMultiStepLR', "SOLVER.MAX_ITER": 40000, "SOLVER.MOMENTUM": 0.9,
    "SOLVER.NESTEROV": False, "SOLVER.REFERENCE_WORLD_SIZE": 0, "SOLVER.STEPS": [30000],
    "SOLVER.WARMUP_FACTOR": 0.001, "SOLVER.WARMUP_ITERS": 1000, "SOLVER.WARMUP_METHOD": 'linear',
    "SOLVER.WEIGHT_DECAY": 0.0001, "SOLVER.WEIGHT_DECAY_BIAS": None, "SOLVER.WEIGHT_DECAY_NORM": 0.0,
    "TEST.DETECTIONS_PER_IMAGE": 100, "TEST.EVAL_PERIOD": 0, "TEST.NO_SEGM": False, "TEST.PRECISE_BN.ENABLED": False,
    "TEST.PRECISE_BN.NUM_ITER": 200, "VIS_PERIOD": 0,
}
# Detectron2's default architecture is C4; cutler builds FPN models only, so YAMLs name these three.
D2_FPN_NAMES = ("MODEL:\n  BACKBONE:\n    NAME: build_resnet_fpn_backbone\n  ROI_HEADS:\n    NAME: StandardROIHeads\n"
                "  ROI_BOX_HEAD:\n    NAME: FastRCNNConvFCHead\n")


def _value(cfg, d2_key):
    node = OmegaConf.select(cfg, d2_key.lower())
    return OmegaConf.to_container(node) if OmegaConf.is_config(node) else node


def test_detectron2_default_table_is_every_key_where_our_default_differs():
    schema = OmegaConf.structured(CutlerConfig)
    differing = {k for k, v in D2_DEFAULTS_REFERENCE.items() if _value(schema, k) != v}
    # MODEL.DEVICE is left out on purpose ("auto" uses CUDA wherever Detectron2's "cuda" runs).
    assert set(DETECTRON2_DEFAULTS) == differing - {"MODEL.DEVICE"}
    assert DETECTRON2_DEFAULTS == {k: D2_DEFAULTS_REFERENCE[k] for k in DETECTRON2_DEFAULTS}
    # The keys the audit named, spelled out.
    assert {"INPUT.MASK_FORMAT", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "MODEL.RPN.PRE_NMS_TOPK_TEST",
            "MODEL.RPN.POST_NMS_TOPK_TRAIN", "MODEL.ANCHOR_GENERATOR.SIZES"} <= set(DETECTRON2_DEFAULTS)


def test_minimal_detectron2_yaml_gets_detectron2_defaults(tmp_path):
    f = tmp_path / "minimal.yaml"
    f.write_text("MODEL:\n  META_ARCHITECTURE: GeneralizedRCNN\n  MASK_ON: True\n" + D2_FPN_NAMES.replace("MODEL:\n", ""))
    cfg = load_config(str(f))
    given = {"MODEL.MASK_ON", "MODEL.BACKBONE.NAME", "MODEL.ROI_HEADS.NAME", "MODEL.ROI_BOX_HEAD.NAME", "MODEL.DEVICE"}
    got = {k: _value(cfg, k) for k in D2_DEFAULTS_REFERENCE if k not in given}
    assert got == {k: v for k, v in D2_DEFAULTS_REFERENCE.items() if k not in given}
    assert cfg.model.mask_on is True and cfg.model.device == "auto"
    assert cfg.input.format == "BGR" and cfg.input.mask_format == "polygon"
    assert (cfg.model.rpn.pre_nms_topk_train, cfg.model.rpn.pre_nms_topk_test, cfg.model.rpn.post_nms_topk_train,
            cfg.model.rpn.post_nms_topk_test) == (12000, 6000, 2000, 1000)
    assert cfg.model.anchor_generator.sizes == [[32, 64, 128, 256, 512]]


def test_detectron2_yaml_relying_on_the_c4_default_architecture_is_refused(tmp_path):
    f = tmp_path / "c4.yaml"
    f.write_text("MODEL:\n  META_ARCHITECTURE: GeneralizedRCNN\n  MASK_ON: True\n")
    with pytest.raises(ConfigKeyError) as err:
        load_config(str(f))
    msg = str(err.value)
    assert "Detectron2's default for 'MODEL.BACKBONE.NAME'" in msg and "build_resnet_backbone" in msg and "c4.yaml" in msg
    # An FPN named without its feature lists keeps Detectron2's C4 lists, which no FPN model can use.
    from cutler.modeling import build_model

    f.write_text(D2_FPN_NAMES)
    with pytest.raises(ValueError, match=r"model.fpn.in_features is empty"):
        build_model(load_config(str(f), ["model.resnets.depth=18", "model.device=cpu"]))
    f.write_text(D2_FPN_NAMES + "  RESNETS:\n    OUT_FEATURES: [res2, res3, res4, res5]\n"
                 "  FPN:\n    IN_FEATURES: [res2, res3, res4, res5]\n")
    with pytest.raises(ValueError, match=r"model.rpn.in_features \['res4'\]"):
        build_model(load_config(str(f), ["model.resnets.depth=18", "model.device=cpu"]))


def test_base_rcnn_fpn_without_format_imports_as_bgr():
    cfg = load_config(str(D2_BASE))  # the published file sets no INPUT.FORMAT, PIXEL_MEAN or MASK_FORMAT
    assert cfg.input.format == "BGR" and cfg.model.pixel_mean == [103.53, 116.28, 123.675]
    assert cfg.model.pixel_std == [1.0, 1.0, 1.0] and cfg.input.mask_format == "polygon"
    # What the file sets wins over the defaults underneath.
    assert (cfg.model.rpn.pre_nms_topk_train, cfg.model.rpn.pre_nms_topk_test, cfg.model.rpn.post_nms_topk_train,
            cfg.model.rpn.post_nms_topk_test) == (2000, 1000, 1000, 1000)
    assert cfg.model.anchor_generator.sizes == [[32], [64], [128], [256], [512]]
    assert cfg.model.rpn.in_features == ["p2", "p3", "p4", "p5", "p6"] and cfg.output_dir == "./output"
