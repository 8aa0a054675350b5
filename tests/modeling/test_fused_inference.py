"""fused_inference.py: at inference the fused layers give the plain layers' outputs (up to float
rounding), follow every change of the weights they derive from, and step aside in training, under
autograd and when traced."""
import copy

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn

from thyroid_det.modeling.fused_inference import (
    FusedConv2d,
    channels_last_on_cpu,
    inference_linear,
    runs_fused,
    unfused,
)


def randomise_norm(module):
    """Non-trivial batch-norm statistics and affine parameters, as after training."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return module


def fused_conv(norm, in_channels=4, out_channels=8, kernel_size=3, **kwargs):
    norms = {
        "BN": nn.BatchNorm2d(out_channels),
        "FrozenBN": FrozenBatchNorm2d(out_channels),
        "GN": nn.GroupNorm(4, out_channels),
        "": None,
    }
    torch.manual_seed(0)
    conv = FusedConv2d(
        in_channels, out_channels, kernel_size=kernel_size, padding=kernel_size // 2,
        bias=not norm, norm=norms[norm], activation=nn.ReLU(inplace=True), **kwargs,
    )
    return randomise_norm(conv).eval()


@pytest.mark.parametrize("norm", ["BN", "FrozenBN", "GN", ""])
def test_fused_conv_matches_the_plain_conv(norm):
    conv = fused_conv(norm)
    x = torch.randn(3, 4, 9, 9)
    plain = conv(x).detach()  # autograd on: the plain path
    with torch.no_grad():
        fused = conv(x)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    plain_conv = Conv2d(4, 8, 3, bias=not norm, norm=conv.norm)
    assert set(conv.state_dict()) == set(plain_conv.state_dict())
    if norm in ("BN", "FrozenBN", ""):
        assert fused.is_contiguous(memory_format=torch.channels_last)  # oneDNN's NHWC path
    else:
        assert not conv.folds_norm()  # GroupNorm depends on the map: nothing to fold


def test_one_input_channel_weight_is_really_channels_last():
    weight = torch.randn(8, 1, 11, 11)
    assert weight.contiguous(memory_format=torch.channels_last).stride() == weight.stride()
    converted = channels_last_on_cpu(weight)
    assert converted.stride() == (121, 1, 11, 1) and torch.equal(converted, weight)
    out = F.conv2d(torch.randn(2, 1, 32, 32), converted, stride=4)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_fused_weights_follow_in_place_updates_and_loading():
    conv = fused_conv("BN")
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        before = conv(x)
        conv.norm.running_mean.add_(1.0)  # as a training step or an EMA swap does
        conv.weight.mul_(2.0)
        after = conv(x)
    torch.testing.assert_close(after, conv(x).detach(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)
    other = fused_conv("BN")
    with torch.no_grad():
        other(x)  # derived weights of its own state
        other.load_state_dict(conv.state_dict())
        torch.testing.assert_close(other(x), conv(x), rtol=1e-5, atol=1e-5)


def test_training_and_copies_use_their_own_weights():
    conv = fused_conv("BN")
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        original = conv(x)  # fills the derived weights
        clone = copy.deepcopy(conv)
        clone.weight.zero_()
        torch.testing.assert_close(clone(x), clone.norm(torch.zeros_like(original)).relu())
        torch.testing.assert_close(conv(x), original, rtol=0, atol=0)
    conv.train()
    assert not runs_fused(conv)
    out = conv(x)  # batch statistics, with a graph
    assert out.requires_grad


@pytest.mark.parametrize("rows", [1, 3, 4, 10, 33])
def test_inference_linear_matches_linear(rows):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    x = torch.randn(rows, 96)
    with torch.no_grad():
        torch.testing.assert_close(inference_linear(linear, x), linear(x), rtol=1e-5, atol=1e-5)
        linear.weight.add_(0.5)
        torch.testing.assert_close(inference_linear(linear, x), linear(x), rtol=1e-5, atol=1e-5)
        weight = linear.weight * 2
        torch.testing.assert_close(
            inference_linear(linear, x, weight, "doubled"), F.linear(x, weight, linear.bias),
            rtol=1e-5, atol=1e-5,
        )


def test_traced_graphs_keep_the_plain_layers():
    conv = fused_conv("BN")
    x = torch.randn(1, 4, 7, 7)
    with torch.no_grad():
        traced = torch.jit.trace(conv, x)
    graph = str(traced.inlined_graph)
    assert "batch_norm" in graph and "mkldnn" not in graph
    with torch.no_grad():
        torch.testing.assert_close(traced(x), conv(x), rtol=1e-5, atol=1e-5)


def test_unfused_runs_the_plain_layers():
    conv = fused_conv("BN")
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        assert runs_fused(conv)
        with unfused():
            assert not runs_fused(conv)
            plain = conv(x)
        assert runs_fused(conv)
        fused = conv(x)
    assert not plain.is_contiguous(memory_format=torch.channels_last)  # NCHW: no fusion
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_compiled_refiner_is_one_graph_of_the_plain_layers():
    """torch.compile (tools/benchmark.py --compile-refiner) traces the plain layers in one graph
    (the fused path's weight caches would break it) and gives the eager fused outputs."""
    from thyroid_det.modeling.refiner_nets import build_refiner

    from .test_refiner_nets import tiny_cfg

    torch.manual_seed(0)
    net = randomise_norm(build_refiner(tiny_cfg("AlexNetSPConv5"))).eval()
    crops = torch.randn(4, 1, 64, 64)
    compiled = torch.compile(net, fullgraph=True, dynamic=False)
    with torch.no_grad():
        eager = net(crops)
        torch.testing.assert_close(compiled(crops), eager, rtol=1e-4, atol=1e-4)
        assert runs_fused(net)  # the eager call above took the fused path
