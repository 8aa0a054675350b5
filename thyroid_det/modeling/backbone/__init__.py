"""Backbones; importing this module registers them in detectron2's BACKBONE_REGISTRY."""

from .fpn import build_vgg16_fpn_backbone  # noqa: F401
from .vgg import VGG16SSD, build_vgg16_ssd_backbone  # noqa: F401
