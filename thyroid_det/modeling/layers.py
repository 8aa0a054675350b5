"""Layer-building rules shared by Ec's backbone (backbone/vgg.py) and the refiners
(refiner_nets.py): channel widths under a width multiplier, and GroupNorm's group count for
narrow layers."""
import math
from typing import Optional

from detectron2.layers import get_norm
from torch import nn

__all__ = ["MAX_NORM_GROUPS", "scaled_channels", "group_norm_groups", "norm_layer"]

MAX_NORM_GROUPS = 32  # detectron2's GN(32)


def scaled_channels(channels: int, width_mult: float, divisor: int = 8) -> int:
    """``channels * width_mult`` rounded to the nearest multiple of ``divisor`` (at least
    ``divisor``): the width of a layer of a network narrowed or widened by ``width_mult``."""
    return max(divisor, int(round(channels * width_mult / divisor)) * divisor)


def group_norm_groups(channels: int, min_group_size: int = 1) -> int:
    """The GroupNorm group count for ``channels``: the largest divisor of 32 that leaves groups of
    at least ``min_group_size`` channels, ``gcd(32, channels // min_group_size)``.

    It is detectron2's GN(32) for every layer 32 * ``min_group_size`` channels wide or wider, and
    still divides the channels of narrow layers (``WIDTH_MULT`` < 1, a pyramid's 1/N levels).
    """
    return math.gcd(MAX_NORM_GROUPS, max(channels // min_group_size, 1))


def norm_layer(norm: str, channels: int, min_group_size: int = 1) -> Optional[nn.Module]:
    """:func:`detectron2.layers.get_norm`, except that "GN" takes
    :func:`group_norm_groups` groups."""
    if norm == "GN":
        return nn.GroupNorm(group_norm_groups(channels, min_group_size), channels)
    return get_norm(norm, channels)
