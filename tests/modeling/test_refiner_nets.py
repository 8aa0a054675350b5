"""Refiner networks (Ef): every variant at every crop size, the spatial pyramid module."""
import pytest
import torch

from thyroid_det.modeling.refiner_nets import (
    REFINER_REGISTRY,
    SpatialPyramidModule,
    build_refiner,
)

from ..conftest import make_cfg

VARIANTS = ("AlexNetSPConv5", "AlexNetSPPool5", "AlexNet", "GoogLeNet")


def tiny_cfg(name, norm="BN"):
    cfg = make_cfg()
    cfg.MODEL.REFINER.NAME = name
    cfg.MODEL.REFINER.WIDTH_MULT = 0.125
    cfg.MODEL.REFINER.FC_DIM = 16
    cfg.MODEL.REFINER.NORM = norm
    return cfg


def test_every_variant_is_registered():
    for name in VARIANTS:
        assert name in REFINER_REGISTRY


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_and_features_for_every_crop_size(name):
    torch.manual_seed(0)
    net = build_refiner(tiny_cfg(name)).eval()
    for size in (64, 96, 128, 224):
        crops = torch.randn(1, 1, size, size)
        with torch.no_grad():
            logits = net(crops)
            if size in (64, 224):
                features = net.features(crops)
                assert features.shape == (1, net.feature_dim), (name, size)
                # the optional head of the registry's contract: forward = cls_score(features)
                torch.testing.assert_close(net.cls_score(features), logits)
        assert logits.shape == (1, 2), (name, size)
        assert torch.isfinite(logits).all()
    expected_dim = 1024 if name == "GoogLeNet" else 16
    assert net.feature_dim == expected_dim


@pytest.mark.parametrize("name", ["AlexNetSPConv5", "AlexNetSPPool5"])
def test_pyramid_variants_train_with_group_norm(name):
    torch.manual_seed(0)
    net = build_refiner(tiny_cfg(name, norm="GN")).train()
    loss = torch.nn.functional.cross_entropy(net(torch.randn(3, 1, 64, 64)), torch.tensor([0, 1, 1]))
    loss.backward()
    assert net.conv1.weight.grad is not None and net.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.pyramid.parameters())


def test_only_pyramid_variants_have_the_module():
    nets = {name: build_refiner(tiny_cfg(name)) for name in VARIANTS[:3]}
    assert nets["AlexNet"].pyramid is None
    assert nets["AlexNetSPConv5"].pyramid_position == "conv5"
    assert nets["AlexNetSPPool5"].pyramid_position == "pool5"
    # The module keeps the channel count, so the variants share fc6's shape.
    assert nets["AlexNetSPConv5"].fc6.weight.shape == nets["AlexNet"].fc6.weight.shape


def test_spatial_pyramid_module_keeps_shape_on_any_map():
    module = SpatialPyramidModule(24, (1, 3, 5), norm="").eval()
    assert len(module.levels) == 3
    for side in (1, 2, 6):
        x = torch.randn(2, 24, side, side)
        out = module(x)
        assert out.shape == x.shape
        assert (out >= 0).all()  # eq. 5's ReLU


def test_spatial_pyramid_module_rejects_even_kernels():
    with pytest.raises(ValueError, match="odd"):
        SpatialPyramidModule(16, (1, 2))


def test_alexnet_rejects_crops_below_64():
    net = build_refiner(tiny_cfg("AlexNet")).eval()
    with pytest.raises(ValueError, match="at least 64"):
        net(torch.randn(1, 1, 48, 48))


def test_refiner_takes_the_configured_input_channels():
    cfg = tiny_cfg("AlexNetSPConv5")
    cfg.MODEL.PIXEL_MEAN = [100.0, 100.0, 100.0]
    cfg.MODEL.PIXEL_STD = [50.0, 50.0, 50.0]
    cfg.MODEL.LUMA_INPUT = False
    net = build_refiner(cfg).eval()
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 2)
    cfg.MODEL.LUMA_INPUT = True  # the ROI heads hand it one luma channel
    assert build_refiner(cfg).conv1.in_channels == 1


def trained_looking(net):
    """Batch-norm statistics and affine parameters away from their initial values."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    with torch.no_grad():
        net.cls_score.weight.normal_(0, 0.3, generator=g)  # logits far from 0
    return net


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("norm", ["BN", "", "GN"])
def test_fused_inference_gives_the_plain_layers_outputs(name, norm):
    # Without autograd, eval mode runs the fused path (batch norm folded, NHWC, pool folded into
    # fc6 below 6x6, oneDNN fc6/fc7 from 4 crops); with autograd, the plain layers. GoogLeNet
    # folds its batch norms and runs NHWC.
    torch.manual_seed(0)
    cfg = tiny_cfg(name, norm)
    cfg.MODEL.REFINER.WIDTH_MULT = 0.25
    cfg.MODEL.REFINER.FC_DIM = 64
    net = trained_looking(build_refiner(cfg)).eval()
    for size, crops in ((64, 5), (96, 1), (128, 6), (224, 4)):  # pool5 1x1, 2x2, 3x3, 6x6
        x = torch.randn(crops, 1, size, size)
        plain = net(x).detach()
        with torch.no_grad():
            fused = net(x)
        assert plain.abs().max() > 0.01  # not a vanishing signal
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5, msg=f"{size} px")


def test_fused_inference_follows_a_training_step():
    torch.manual_seed(0)
    net = trained_looking(build_refiner(tiny_cfg("AlexNetSPConv5")))
    x = torch.randn(4, 1, 128, 128)
    with torch.no_grad():
        before = net.eval()(x)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    torch.nn.functional.cross_entropy(net(x), torch.tensor([0, 1, 1, 0])).backward()
    optimizer.step()  # in-place updates of every weight; BN statistics move too
    net.eval()
    with torch.no_grad():
        after = net(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, net(x).detach(), rtol=1e-4, atol=1e-5)
