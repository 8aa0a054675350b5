"""layers.py: the width and GroupNorm rules Ec's backbone and the refiners share, pinned to the
values the two modules computed before they shared them (so saved checkpoints keep loading)."""
import math

import pytest
from torch import nn

from thyroid_det.modeling.backbone.vgg import VGG16SSD
from thyroid_det.modeling.layers import group_norm_groups, norm_layer, scaled_channels
from thyroid_det.modeling.refiner_nets import build_refiner

from ..conftest import make_cfg


@pytest.mark.parametrize(
    "channels,mult,expected",
    [
        (64, 1.0, 64), (64, 0.25, 16), (64, 0.125, 8), (64, 1 / 16, 8), (192, 0.5, 96),
        (384, 0.125, 48), (1024, 0.25, 256), (100, 1.0, 96), (108, 1.0, 112), (4, 1.0, 8),
    ],
)
def test_scaled_channels_round_to_multiples_of_8(channels, mult, expected):
    # Python rounds halves to even: 12.5 eights -> 96, 13.5 -> 112, as both modules always did.
    assert scaled_channels(channels, mult) == expected
    assert scaled_channels(channels, mult) == max(8, int(round(channels * mult / 8)) * 8)


@pytest.mark.parametrize("channels", [1, 8, 16, 24, 42, 48, 96, 128, 256, 512, 1024])
def test_group_counts_divide_channels_and_keep_min_group_size(channels):
    assert group_norm_groups(channels) == math.gcd(32, channels)
    assert group_norm_groups(channels, min_group_size=2) == math.gcd(32, max(channels // 2, 1))
    for size in (1, 2):
        groups = group_norm_groups(channels, size)
        assert channels % groups == 0 and groups <= 32
        assert channels // groups >= min(size, channels)


def test_norm_layer_builds_group_norm_and_defers_the_rest_to_detectron2():
    gn = norm_layer("GN", 48, min_group_size=2)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 8 and gn.num_channels == 48
    assert isinstance(norm_layer("BN", 16), nn.BatchNorm2d)
    assert norm_layer("", 16) is None


def test_vgg_and_refiner_group_norms_keep_their_group_counts():
    vgg = VGG16SSD(width_mult=0.25, norm="GN")
    vgg_norms = [m for m in vgg.modules() if isinstance(m, nn.GroupNorm)]
    assert vgg_norms and all(
        m.num_groups == math.gcd(32, m.num_channels // 2) for m in vgg_norms
    )
    cfg = make_cfg()
    cfg.MODEL.REFINER.WIDTH_MULT = 0.5
    cfg.MODEL.REFINER.NORM = "GN"
    refiner = build_refiner(cfg)
    refiner_norms = [m for m in refiner.modules() if isinstance(m, nn.GroupNorm)]
    assert refiner_norms and all(
        m.num_groups == math.gcd(32, m.num_channels) for m in refiner_norms
    )
    # The pyramid's 1/3 levels (42 channels at half width) are why the refiner's rule differs.
    assert any(m.num_channels == 42 and m.num_groups == 2 for m in refiner_norms)
