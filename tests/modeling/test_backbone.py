"""VGG16SSD: level sizes and strides on any input size, options, freezing."""

import math

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone
from torch import nn

from thyroid_det.modeling.backbone.vgg import VGG16SSD, L2Norm
from thyroid_det.modeling.model_input import model_input_channels

from ..conftest import make_cfg

LEVELS = ["conv4_3", "fc7", "extra1", "extra2", "extra3", "extra4", "extra5"]


def narrow_vgg(**kwargs):
    kwargs.setdefault("width_mult", 1 / 16)
    kwargs.setdefault("extra_channels", [32, 16, 16, 16, 16])
    kwargs.setdefault("out_features", LEVELS)
    return VGG16SSD(**kwargs)


def test_built_from_config_with_grayscale_input():
    cfg = make_cfg("ssd512_vgg16.yaml")
    cfg.MODEL.VGG.WIDTH_MULT = 1 / 16
    backbone = build_backbone(cfg, ShapeSpec(channels=model_input_channels(cfg)))
    assert isinstance(backbone, VGG16SSD)
    assert backbone.conv1[0].in_channels == 1  # MultiScaleSSD converts BGR to luma first
    shapes = backbone.output_shape()
    assert list(shapes) == LEVELS
    assert [shapes[n].stride for n in LEVELS] == [8, 16, 32, 64, 128, 256, 512]


@pytest.mark.parametrize("height,width", [(128, 128), (97, 130), (75, 61), (300, 300)])
def test_levels_are_ceil_of_input_over_stride(height, width):
    backbone = narrow_vgg().eval()
    with torch.no_grad():
        out = backbone(torch.zeros(2, 1, height, width))
    shapes = backbone.output_shape()
    for name in LEVELS:
        stride = shapes[name].stride
        assert out[name].shape == (
            2,
            shapes[name].channels,
            math.ceil(height / stride),
            math.ceil(width / stride),
        ), name


def test_published_channels_at_full_width():
    levels = ["conv4_3", "fc7", "extra1", "extra2"]
    shapes = VGG16SSD(extra_channels=[512, 256], out_features=levels).output_shape()
    assert [shapes[n].channels for n in levels] == [512, 1024, 512, 256]


def test_out_features_subset_and_unknown_name():
    backbone = narrow_vgg(out_features=["fc7", "extra2"]).eval()
    assert list(backbone.output_shape()) == ["fc7", "extra2"]
    with torch.no_grad():
        assert set(backbone(torch.zeros(1, 1, 64, 64))) == {"fc7", "extra2"}
    with pytest.raises(ValueError, match="extra9"):
        narrow_vgg(out_features=["conv4_3", "extra9"])


@pytest.mark.parametrize("norm", ["", "BN", "GN"])
def test_norms_train_on_narrow_nets(norm):
    backbone = narrow_vgg(norm=norm).train()
    out = backbone(torch.randn(2, 1, 64, 64))
    sum(v.mean() for v in out.values()).backward()
    assert all(torch.isfinite(v).all() for v in out.values())
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    assert all((m.bias is None) == bool(norm) for m in convs)
    assert all(m.norm is not None for m in convs) == bool(norm)


def test_conv4_3_is_l2_normalised_with_learnt_scale():
    norm = L2Norm(8, scale=20.0)
    y = norm(torch.randn(2, 8, 5, 5))
    assert torch.allclose(y.norm(dim=1), torch.full((2, 5, 5), 20.0), atol=1e-4)
    backbone = narrow_vgg()
    assert torch.allclose(
        backbone.conv4_3_norm.weight, torch.full_like(backbone.conv4_3_norm.weight, 20.0)
    )
    assert backbone.conv4_3_norm.weight.requires_grad


def test_freeze_at_freezes_first_stages():
    backbone = narrow_vgg(norm="BN", freeze_at=2)
    for stage in ("conv1", "conv2"):
        module = getattr(backbone, stage)
        assert all(not p.requires_grad for p in module.parameters())
        assert any(isinstance(m, FrozenBatchNorm2d) for m in module.modules())
    assert all(p.requires_grad for p in backbone.conv3.parameters())
    assert all(p.requires_grad for p in backbone.extra1.parameters())
    with pytest.raises(ValueError, match="freeze_at"):
        narrow_vgg(freeze_at=6)


def test_shape_spec_channels_reach_first_conv():
    cfg = make_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_vgg16_ssd_backbone"
    cfg.MODEL.VGG.WIDTH_MULT = 1 / 16
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    assert backbone.conv1[0].in_channels == 3
