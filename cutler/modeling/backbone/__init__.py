"""Backbones: ResNet and ResNet-FPN with Detectron2 module names."""
from .fpn import FPN, LastLevelMaxPool, build_resnet_fpn_backbone
from .resnet import BasicStem, BottleneckBlock, ResNet, build_resnet_backbone

BACKBONES = {"build_resnet_fpn_backbone": build_resnet_fpn_backbone}


def build_backbone(cfg):
    """The backbone named by ``cfg.model.backbone.name`` (Detectron2's registry names)."""
    name = cfg.model.backbone.name
    if name not in BACKBONES:
        raise ValueError(f"model.backbone.name={name!r} is not available; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](cfg)


__all__ = ["FPN", "BasicStem", "BottleneckBlock", "LastLevelMaxPool", "ResNet", "build_backbone",
           "build_resnet_backbone", "build_resnet_fpn_backbone"]
