"""Configuration: schema, overrides, unknown-key errors, Detectron2 YAML import/export, shipped configs."""
import glob
import os
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from cutler.config import CONFIGS_DIR, ConfigKeyError, load_config
from cutler.config.detectron2_yaml import export_detectron2_yaml, import_detectron2_yaml

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
        assert OmegaConf.to_container(back[section]) == OmegaConf.to_container(cfg[section]), section


def test_plain_detectron2_export_drops_cutler_keys():
    cfg = load_config("cutler/imagenet_cascade_r0.yaml")
    text = export_detectron2_yaml(cfg, include_cutler_fork_keys=False)
    assert "USE_DROPLOSS" not in text and "COPY_PASTE" not in text and "MASKCUT" not in text
    assert "USE_DROPLOSS: true" in export_detectron2_yaml(cfg)


# Published CutLER recipes written in Detectron2's vocabulary (values from the CutLER repository),
# imported and compared with our shipped equivalents.
D2_BASE = {
    "MODEL": {"META_ARCHITECTURE": "GeneralizedRCNN", "BACKBONE": {"NAME": "build_resnet_fpn_backbone"},
              "RESNETS": {"OUT_FEATURES": ["res2", "res3", "res4", "res5"]},
              "FPN": {"IN_FEATURES": ["res2", "res3", "res4", "res5"]},
              "ANCHOR_GENERATOR": {"SIZES": [[32], [64], [128], [256], [512]], "ASPECT_RATIOS": [[0.5, 1.0, 2.0]]},
              "RPN": {"IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"], "PRE_NMS_TOPK_TRAIN": 2000,
                      "PRE_NMS_TOPK_TEST": 1000, "POST_NMS_TOPK_TRAIN": 1000, "POST_NMS_TOPK_TEST": 1000},
              "ROI_HEADS": {"NAME": "StandardROIHeads", "IN_FEATURES": ["p2", "p3", "p4", "p5"]},
              "ROI_BOX_HEAD": {"NAME": "FastRCNNConvFCHead", "NUM_FC": 2, "POOLER_RESOLUTION": 7},
              "ROI_MASK_HEAD": {"NAME": "MaskRCNNConvUpsampleHead", "NUM_CONV": 4, "POOLER_RESOLUTION": 14}},
    "DATASETS": {"TRAIN": "('coco_2017_train',)", "TEST": "('coco_2017_val',)"},
    "SOLVER": {"IMS_PER_BATCH": 16, "BASE_LR": 0.02, "STEPS": "(60000, 80000)", "MAX_ITER": 90000},
    "INPUT": {"MIN_SIZE_TRAIN": "(640, 672, 704, 736, 768, 800)"}, "VERSION": 2,
}
D2_UNSUP_MODEL = {"PIXEL_MEAN": [123.675, 116.280, 103.530], "PIXEL_STD": [58.395, 57.120, 57.375], "MASK_ON": True,
                  "BACKBONE": {"FREEZE_AT": 0}, "RESNETS": {"DEPTH": 50, "NORM": "SyncBN", "STRIDE_IN_1X1": False},
                  "FPN": {"NORM": "SyncBN"}}
D2_INPUT = {"MIN_SIZE_TRAIN": "(240, 320, 480, 640, 672, 704, 736, 768, 800, 1024)", "MAX_SIZE_TRAIN": 1333,
            "MASK_FORMAT": "bitmask", "FORMAT": "RGB"}
D2_CLIP = {"CLIP_TYPE": "norm", "CLIP_VALUE": 1.0, "ENABLED": True, "NORM_TYPE": 2.0}


def _copy_paste(min_ratio, workers):
    return {"COPY_PASTE": True, "COPY_PASTE_RATE": 1.0, "VISUALIZE_COPY_PASTE": False, "COPY_PASTE_RANDOM_NUM": True,
            "COPY_PASTE_MIN_RATIO": min_ratio, "COPY_PASTE_MAX_RATIO": 1.0, "NUM_WORKERS": workers}


PUBLISHED = {
    "cutler/imagenet_cascade_r0.yaml": {
        "DATALOADER": _copy_paste(0.3, 0),
        "MODEL": {**D2_UNSUP_MODEL, "ROI_BOX_HEAD": {"CLS_AGNOSTIC_BBOX_REG": True},
                  "ROI_HEADS": {"NAME": "CustomCascadeROIHeads", "NUM_CLASSES": 1, "SCORE_THRESH_TEST": 0.0,
                                "POSITIVE_FRACTION": 0.25, "USE_DROPLOSS": True, "DROPLOSS_IOU_THRESH": 0.01},
                  "RPN": {"POST_NMS_TOPK_TRAIN": 4000, "NMS_THRESH": 0.65}},
        "DATASETS": {"TRAIN": "('imagenet_train',)"},
        "SOLVER": {"IMS_PER_BATCH": 16, "BASE_LR": 0.01, "WEIGHT_DECAY": 0.00005, "STEPS": "(80000,)",
                   "MAX_ITER": 160000, "GAMMA": 0.02, "CLIP_GRADIENTS": D2_CLIP, "AMP": {"ENABLED": True}},
        "INPUT": D2_INPUT, "TEST": {"PRECISE_BN": {"ENABLED": True, "NUM_ITER": 200}, "DETECTIONS_PER_IMAGE": 100},
        "OUTPUT_DIR": "output/",
    },
    "cutler/imagenet_cascade_self_train.yaml": {
        "DATALOADER": _copy_paste(0.5, 2),
        "MODEL": {**D2_UNSUP_MODEL, "ROI_BOX_HEAD": {"CLS_AGNOSTIC_BBOX_REG": True},
                  "ROI_HEADS": {"NAME": "CustomCascadeROIHeads", "NUM_CLASSES": 1, "SCORE_THRESH_TEST": 0.0,
                                "POSITIVE_FRACTION": 0.25, "USE_DROPLOSS": False, "DROPLOSS_IOU_THRESH": 0.01}},
        "DATASETS": {"TRAIN": "('imagenet_train_r1',)"},
        "SOLVER": {"IMS_PER_BATCH": 16, "BASE_LR": 0.005, "STEPS": "(79999,)", "MAX_ITER": 80000, "GAMMA": 1.0,
                   "CLIP_GRADIENTS": D2_CLIP, "AMP": {"ENABLED": True}},
        "INPUT": D2_INPUT, "TEST": {"PRECISE_BN": {"ENABLED": True, "NUM_ITER": 200}, "DETECTIONS_PER_IMAGE": 100},
        "OUTPUT_DIR": "output/self-train-r1/",
    },
    "cutler/imagenet_mask_rcnn_r0.yaml": {
        "DATALOADER": {k: v for k, v in _copy_paste(0.3, 4).items() if k != "NUM_WORKERS"},
        "MODEL": {**D2_UNSUP_MODEL,
                  "ROI_HEADS": {"NAME": "CustomStandardROIHeads", "NUM_CLASSES": 1, "SCORE_THRESH_TEST": 0.0,
                                "USE_DROPLOSS": True, "DROPLOSS_IOU_THRESH": 0.01},
                  "RPN": {"POST_NMS_TOPK_TRAIN": 4000, "NMS_THRESH": 0.65}},
        "DATASETS": {"TRAIN": "('imagenet_train',)"},
        "SOLVER": {"IMS_PER_BATCH": 16, "BASE_LR": 0.01, "WEIGHT_DECAY": 0.00005, "STEPS": "(80000,)",
                   "MAX_ITER": 160000, "CLIP_GRADIENTS": D2_CLIP},
        "INPUT": D2_INPUT, "TEST": {"PRECISE_BN": {"ENABLED": True}}, "OUTPUT_DIR": "output/",
    },
    "coco_semi/cascade_1perc.yaml": {
        "MODEL": {**D2_UNSUP_MODEL, "ROI_BOX_HEAD": {"CLS_AGNOSTIC_BBOX_REG": True},
                  "ROI_HEADS": {"NAME": "CustomCascadeROIHeads"}, "RPN": {"POST_NMS_TOPK_TRAIN": 2000}},
        "DATASETS": {"TRAIN": "('coco_semi_1perc',)", "TEST": "('coco_2017_val',)"},
        "SOLVER": {"IMS_PER_BATCH": 16, "BASE_LR": 0.04, "STEPS": "(2400, 3200)", "MAX_ITER": 3600,
                   "WARMUP_FACTOR": 0.001, "WARMUP_ITERS": 1000, "BASE_LR_MULTIPLIER": 4,
                   "BASE_LR_MULTIPLIER_NAMES": ["roi_heads.mask_head.predictor"] + [
                       f"roi_heads.box_predictor.{s}.{n}" for s in range(3) for n in ("cls_score", "bbox_pred")]},
        "INPUT": {**D2_INPUT, "MIN_SIZE_TRAIN": "(640, 672, 704, 736, 768, 800)"},
        "TEST": {"PRECISE_BN": {"ENABLED": True}, "EVAL_PERIOD": 5000}, "OUTPUT_DIR": "output/1perc",
    },
}


@pytest.mark.parametrize("ours", sorted(PUBLISHED))
def test_published_detectron2_recipe_imports_to_our_shipped_config(ours, tmp_path):
    (tmp_path / "Base-RCNN-FPN.yaml").write_text(yaml.safe_dump(D2_BASE))
    sub = tmp_path / "recipes"
    sub.mkdir()
    recipe = dict(PUBLISHED[ours], _BASE_="../Base-RCNN-FPN.yaml")
    (sub / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    imported = load_config(str(sub / "recipe.yaml"), ["model.weights=''"])
    shipped = load_config(ours)
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
    f.write_text("SOLVER:\n  STEPS: (10, 20)\nDATASETS:\n  TRAIN: ('a', 'b')\n")
    data = import_detectron2_yaml(f)
    assert data["solver"]["steps"] == [10, 20] and data["datasets"]["train"] == ["a", "b"]
