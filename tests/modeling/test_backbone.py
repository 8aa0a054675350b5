"""VGG16SSD: level sizes and strides on any input size, options, freezing, weight conversion."""

import importlib.util
import math
import os
import pickle

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone
from torch import nn
from torch.nn import functional as F

from thyroid_det import add_mccnn_config
from thyroid_det.modeling.backbone.vgg import VGG16SSD, L2Norm
from thyroid_det.modeling.model_input import model_input_channels

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LEVELS = ["conv4_3", "fc7", "extra1", "extra2", "extra3", "extra4", "extra5"]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def narrow_vgg(**kwargs):
    kwargs.setdefault("width_mult", 1 / 16)
    kwargs.setdefault("extra_channels", [32, 16, 16, 16, 16])
    kwargs.setdefault("out_features", LEVELS)
    return VGG16SSD(**kwargs)


def test_built_from_config_with_grayscale_input():
    cfg = get_cfg()
    add_mccnn_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "ssd512_vgg16.yaml"))
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


def _fake_torchvision_vgg16(seed=0):
    """A state dict with torchvision vgg16's keys and shapes (fc6 filled only where SSD samples)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    cin = 3
    idx = 0
    for _, num_convs, width in (
        ("", 2, 64),
        ("", 2, 128),
        ("", 3, 256),
        ("", 3, 512),
        ("", 3, 512),
    ):
        for _ in range(num_convs):
            state[f"features.{idx}.weight"] = torch.randn(width, cin, 3, 3, generator=g) * 0.05
            state[f"features.{idx}.bias"] = torch.randn(width, generator=g) * 0.1
            cin = width
            idx += 2
        idx += 1  # the pool
    fc6 = torch.empty(4096, 512 * 7 * 7)  # only the taps SSD keeps are read (and filled)
    fc6.view(4096, 512, 7, 7)[::4, :, ::3, ::3] = torch.randn(1024, 512, 3, 3, generator=g)
    state["classifier.0.weight"] = fc6
    state["classifier.0.bias"] = torch.arange(4096, dtype=torch.float32)
    state["classifier.3.weight"] = torch.randn(4096, 4096, generator=g)
    state["classifier.3.bias"] = torch.arange(4096, dtype=torch.float32)
    state["classifier.6.weight"] = torch.zeros(1000, 4096)
    state["classifier.6.bias"] = torch.zeros(1000)
    return state


def test_convert_vgg16_weights_loads_and_preserves_conv1(tmp_path):
    tool = load_tool("convert_vgg16_weights")
    state = _fake_torchvision_vgg16()
    model, skipped = tool.convert(state, in_channels=1, pixel_mean=[58.6], pixel_std=[50.2])
    assert skipped == ["classifier.6.bias", "classifier.6.weight"]
    path = str(tmp_path / "vgg16_gray.pkl")
    tool.write_checkpoint(model, path)

    holder = nn.Module()
    holder.backbone = VGG16SSD(extra_channels=[16], out_features=["conv4_3", "fc7"])
    DetectionCheckpointer(holder).load(path)
    sd = holder.backbone.state_dict()
    assert torch.equal(sd["conv5.2.weight"], state["features.28.weight"])
    assert torch.equal(
        sd["fc6.weight"], state["classifier.0.weight"].view(4096, 512, 7, 7)[::4, :, ::3, ::3]
    )
    assert torch.equal(sd["fc6.bias"], torch.arange(0, 4096, 4, dtype=torch.float32))
    assert torch.equal(sd["fc7.weight"][:, :, 0, 0], state["classifier.3.weight"][::4, ::4])
    assert holder.backbone.fc6.dilation == (6, 6)

    # conv1_1 on our normalised grayscale == torchvision's conv1_1 on the ImageNet-normalised
    # RGB copy of the same image, away from the zero-padded border.
    gray = torch.rand(1, 1, 16, 16) * 255
    ours = F.conv2d((gray - 58.6) / 50.2, sd["conv1.0.weight"], sd["conv1.0.bias"], padding=1)
    mean = torch.tensor(tool.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(tool.IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (gray.expand(1, 3, 16, 16) / 255 - mean) / std
    ref = F.conv2d(rgb, state["features.0.weight"], state["features.0.bias"], padding=1)
    assert torch.allclose(ours[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-3)

    summed, _ = tool.convert(state, in_channels=1, fold=False)
    assert np.allclose(
        summed["backbone.conv1.0.weight"], state["features.0.weight"].sum(1, keepdim=True).numpy()
    )
    with open(path, "rb") as f:
        assert pickle.load(f)["__author__"].startswith("thyroid_det")


def test_convert_vgg16_weights_rejects_other_files(tmp_path, capsys):
    tool = load_tool("convert_vgg16_weights")
    bad = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
    with pytest.raises(SystemExit, match=r"resnet\.pth: expected the 13 conv layers"):
        tool.main([str(bad), str(tmp_path / "out.pkl")])
    with pytest.raises(SystemExit, match="Cannot read"):
        tool.main([str(tmp_path / "missing.pth"), str(tmp_path / "out.pkl")])
    assert not (tmp_path / "out.pkl").exists()


def test_shape_spec_channels_reach_first_conv():
    cfg = get_cfg()
    add_mccnn_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_vgg16_ssd_backbone"
    cfg.MODEL.VGG.WIDTH_MULT = 1 / 16
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    assert backbone.conv1[0].in_channels == 3
