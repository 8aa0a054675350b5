"""VGG-16 (with SSD's extra layers) under detectron2's FPN, for detectors with a shared head."""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN

from .vgg import build_vgg16_ssd_backbone

__all__ = ["build_vgg16_fpn_backbone"]


@BACKBONE_REGISTRY.register()
def build_vgg16_fpn_backbone(cfg, input_shape: ShapeSpec):
    """detectron2's :class:`FPN` on :class:`VGG16SSD`, without a top block.

    RetinaNet's head shares its convolutions across levels, so every level it sees needs the
    same channels; VGG-16's levels have 512, 1024, then ``MODEL.VGG.EXTRA_CHANNELS`` channels.
    FPN maps each level named in ``MODEL.FPN.IN_FEATURES`` (consecutive VGG levels, e.g.
    conv4_3, fc7, extra1..extra3 at strides 8..128) to ``MODEL.FPN.OUT_CHANNELS`` channels,
    named "p3".."p7" after their strides. SSD's extra layers play the part of RetinaNet's P6/P7
    convolutions, so no top block is added.
    """
    bottom_up = build_vgg16_ssd_backbone(cfg, input_shape)
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    missing = [f for f in in_features if f not in bottom_up.output_shape()]
    if not in_features or missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES {in_features} must be non-empty outputs of the VGG-16 "
            f"backbone; missing {missing} from MODEL.VGG.OUT_FEATURES "
            f"{list(cfg.MODEL.VGG.OUT_FEATURES)}"
        )
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=None,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
