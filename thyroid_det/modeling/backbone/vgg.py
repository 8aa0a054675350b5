"""VGG-16 truncated for SSD, with SSD's extra layers, as a detectron2 backbone."""

from typing import Dict, List, Sequence

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn
from torch.nn import functional as F

from ..layers import norm_layer, scaled_channels

__all__ = ["VGG16SSD", "L2Norm", "build_vgg16_ssd_backbone"]

# (stage name, number of 3x3 convs, output channels) of VGG-16's five conv stages.
_VGG16_STAGES = (
    ("conv1", 2, 64),
    ("conv2", 2, 128),
    ("conv3", 3, 256),
    ("conv4", 3, 512),
    ("conv5", 3, 512),
)
_FC6_DILATION = 6


# GN groups of at least two channels: gcd(32, channels / 2) groups, detectron2's GN(32) for every
# layer at full width, and in narrow nets still two channels per group, which a 1x1 map needs to be
# normalised at all.
_GN_MIN_GROUP_SIZE = 2


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learnt per-channel scale (SSD's conv4_3 norm).

    conv4_3's activations are much larger than those of the deeper levels; normalising them keeps
    the prediction heads of all levels on a similar footing (ParseNet; SSD section 3.1).
    """

    def __init__(self, channels: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x):
        return F.normalize(x, p=2.0, dim=1, eps=1e-10) * self.weight.view(1, -1, 1, 1)


class VGG16SSD(Backbone):
    """VGG-16 as modified by SSD, followed by SSD's extra feature layers.

    Changes to VGG-16 (SSD section 3): pool3 rounds up, pool5 is 3x3 with stride 1, fc6 becomes a
    3x3 convolution with dilation 6 and 1024 channels, fc7 a 1x1 convolution with 1024 channels.
    conv4_3 is L2-normalised with a learnt scale before it is emitted. Each extra level is a 1x1
    convolution to half its channels followed by a 3x3 stride-2 convolution.

    Every pooling and stride-2 convolution rounds up, so a level of stride ``s`` is exactly
    ``ceil(H / s) x ceil(W / s)`` for any input size ``H x W``.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        width_mult: float = 1.0,
        norm: str = "",
        conv4_3_scale: float = 20.0,
        extra_channels: Sequence[int] = (512, 256, 256, 256),
        out_features: Sequence[str] = ("conv4_3", "fc7", "extra1", "extra2", "extra3", "extra4"),
        freeze_at: int = 0,
    ):
        """
        Args:
            in_channels: channels of the input image (1 for grayscale ultrasound).
            width_mult: multiplier on every channel count (rounded to a multiple of 8); 1.0 is
                the published VGG-16.
            norm: normalisation after every convolution, one of "", "BN", "GN", "SyncBN" (see
                :func:`detectron2.layers.get_norm`); GN uses gcd(32, channels / 2) groups.
            conv4_3_scale: initial value of conv4_3's learnt L2-normalisation scale.
            extra_channels: output channels of each extra level after fc7; its length sets the
                number of extra levels ("extra1".."extraN").
            out_features: names of the levels to return, a subset of "conv4_3", "fc7",
                "extra1".."extraN".
            freeze_at: freeze the first ``freeze_at`` VGG stages (0: none, 1: conv1_x, ...,
                5: conv1_x to conv5_x); their BN layers become FrozenBatchNorm2d.
        """
        super().__init__()
        if not 0 <= freeze_at <= len(_VGG16_STAGES):
            raise ValueError(f"VGG16SSD: freeze_at must be in [0, 5], got {freeze_at}")
        names = ["conv4_3", "fc7"] + [f"extra{i + 1}" for i in range(len(extra_channels))]
        unknown = [f for f in out_features if f not in names]
        if unknown or not out_features:
            raise ValueError(f"VGG16SSD: unknown out_features {unknown}; available: {names}")

        def conv(cin, cout, **kwargs):
            # In-place ReLU, as torchvision's VGG: neither the conv's nor the norm's backward
            # needs the pre-activation, and an out-of-place one costs a full copy per layer.
            return Conv2d(
                cin,
                cout,
                bias=not norm,
                norm=norm_layer(norm, cout, min_group_size=_GN_MIN_GROUP_SIZE),
                activation=nn.ReLU(inplace=True),
                **kwargs,
            )

        self.stage_names = []
        channels = in_channels
        for stage, num_convs, width in _VGG16_STAGES:
            width = scaled_channels(width, width_mult)
            layers = []
            for i in range(num_convs):
                layers.append(conv(channels, width, kernel_size=3, padding=1))
                channels = width
            self.add_module(stage, nn.Sequential(*layers))
            self.stage_names.append(stage)
        self.conv4_3_norm = L2Norm(scaled_channels(512, width_mult), conv4_3_scale)

        fc_width = scaled_channels(1024, width_mult)
        self.fc6 = conv(
            channels, fc_width, kernel_size=3, padding=_FC6_DILATION, dilation=_FC6_DILATION
        )
        self.fc7 = conv(fc_width, fc_width, kernel_size=1)

        channels = fc_width
        self.extra_names = []
        for i, width in enumerate(extra_channels):
            width = scaled_channels(width, width_mult)
            reduce = max(8, width // 2)
            name = f"extra{i + 1}"
            self.add_module(
                name,
                nn.Sequential(
                    conv(channels, reduce, kernel_size=1),
                    conv(reduce, width, kernel_size=3, stride=2, padding=1),
                ),
            )
            self.extra_names.append(name)
            channels = width

        level_channels = [scaled_channels(512, width_mult), fc_width] + [
            scaled_channels(c, width_mult) for c in extra_channels
        ]
        self._out_features = list(out_features)
        self._out_feature_channels = dict(zip(names, level_channels))
        self._out_feature_strides = {name: 8 * 2**i for i, name in enumerate(names)}
        self._last_needed = max(names.index(f) for f in out_features)
        self._names = names

        self._init_weights()
        self.freeze(freeze_at)

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def freeze(self, freeze_at: int = 0):
        """Freeze the first ``freeze_at`` VGG stages (parameters and BN statistics)."""
        for stage in self.stage_names[:freeze_at]:
            module = getattr(self, stage)
            for p in module.parameters():
                p.requires_grad = False
            setattr(self, stage, FrozenBatchNorm2d.convert_frozen_batchnorm(module))
        return self

    def forward(self, x) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (N, C, H, W) normalised images.

        Returns:
            dict[str, Tensor]: the levels named in ``out_features``.
        """
        if x.dim() != 4:
            raise ValueError(f"VGG16SSD takes (N, C, H, W) input, got shape {tuple(x.shape)}")
        levels: List[torch.Tensor] = []
        for stage in self.stage_names[:4]:
            x = getattr(self, stage)(x)
            if stage == "conv4":
                levels.append(self.conv4_3_norm(x))
            x = F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
        if self._last_needed >= 1:
            x = self.conv5(x)
            x = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
            x = self.fc7(self.fc6(x))
            levels.append(x)
            for name in self.extra_names[: self._last_needed - 1]:
                x = getattr(self, name)(x)
                levels.append(x)
        return {name: levels[i] for i, name in enumerate(self._names) if name in self._out_features}


@BACKBONE_REGISTRY.register()
def build_vgg16_ssd_backbone(cfg, input_shape: ShapeSpec):
    """Build :class:`VGG16SSD` from ``cfg.MODEL.VGG`` and ``cfg.MODEL.BACKBONE.FREEZE_AT``."""
    return VGG16SSD(
        in_channels=input_shape.channels,
        width_mult=cfg.MODEL.VGG.WIDTH_MULT,
        norm=cfg.MODEL.VGG.NORM,
        conv4_3_scale=cfg.MODEL.VGG.CONV4_3_SCALE,
        extra_channels=cfg.MODEL.VGG.EXTRA_CHANNELS,
        out_features=cfg.MODEL.VGG.OUT_FEATURES,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
    )
