"""Fine-recognition networks Ef (paper III, Table III / Fig. 8) behind ``REFINER_REGISTRY``.

Every network maps a batch of square grayscale crops (N, C, S, S) to logits over
[benign, malignant] with ``forward`` and to its penultimate features with ``features`` (the fc7
features the paper feeds to the classical classifiers in its classifier study).

At inference (eval mode, no autograd) the networks run fused, with the same outputs up to float
rounding: batch norms folded into their convolutions, channels-last on the CPU
(:mod:`.fused_inference`), the pyramid's 1x1 reductions as one convolution, the adaptive pool
folded into fc6 for maps under 6x6, fc6/fc7 through oneDNN for several crops on the CPU.
"""
import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.utils.registry import Registry
from fvcore.nn import weight_init
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.models.googlenet import GoogLeNet as _TorchvisionGoogLeNet
from torchvision.models.googlenet import Inception, InceptionAux

from .fused_inference import (
    FusedConv2d,
    channels_last_on_cpu,
    derived_tensors,
    folded_conv_norm,
    folds_into_conv,
    inference_linear,
    runs_fused,
)
from .layers import norm_layer, scaled_channels
from .model_input import model_input_channels

__all__ = [
    "REFINER_REGISTRY",
    "build_refiner",
    "SpatialPyramidModule",
    "AlexNet",
    "AlexNetSPConv5",
    "AlexNetSPPool5",
    "GoogLeNet",
]

REFINER_REGISTRY = Registry("REFINER")
REFINER_REGISTRY.__doc__ = """
Registry for the refiner (fine recognition) networks of MC-CNN's cascade.

The registered object is called with `obj(cfg, num_classes=K)` and must return an nn.Module with
`forward(crops) -> logits (N, K)`, `features(crops) -> (N, D)` and an int attribute
`feature_dim` (= D). Optionally `cls_score(features) -> logits`, with `forward(x) ==
cls_score(features(x))`: tools that need both (tools/classifier_study.py) then run the network once.
"""

ALEXNET_CHANNELS = (64, 192, 384, 256, 256)


def build_refiner(cfg, num_classes: int = 2):
    """Build the refiner network named by ``cfg.MODEL.REFINER.NAME``, with ``num_classes``
    logits."""
    return REFINER_REGISTRY.get(cfg.MODEL.REFINER.NAME)(cfg, num_classes=num_classes)


def _conv(in_channels, out_channels, kernel_size, norm, stride=1, padding=None):
    """Conv + norm + ReLU; the bias is dropped when a norm follows."""
    if padding is None:
        padding = kernel_size // 2
    conv = FusedConv2d(
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        bias=not norm,
        norm=norm_layer(norm, out_channels),
        activation=nn.ReLU(inplace=True),  # in place: saves a copy per layer, as in torchvision
    )
    weight_init.c2_msra_fill(conv)
    return conv


class SpatialPyramidModule(nn.Module):
    """The spatial pyramid module of Fig. 6 and eqs. 4-5.

    Level i averages each position over a k_i x k_i neighbourhood (stride 1, so every level keeps
    the input's spatial size and the levels stay aligned), reduces the channels to 1/N with a
    1x1 conv (N = number of levels, "to maintain the weight of the global feature") and, for
    k_i > 1, applies a k_i x k_i conv: one pooling and one convolution per scale, as in Fig. 6.
    As in PSPNet, which the paper's 1/N reduction comes from, the input features are
    concatenated with the levels so that local detail is kept next to the context; a 1x1 conv
    then maps the concatenation back to the input's channel count, followed by the ReLU of
    eq. 5. Keeping the channel count lets the pyramid variants share AlexNet's fc6 size, so
    Table III compares the module and not a wider fc6.
    """

    def __init__(self, in_channels: int, kernel_sizes: Sequence[int] = (1, 3, 5), norm: str = ""):
        """
        Args:
            in_channels: channels of the feature map entering the module (= channels out).
            kernel_sizes: odd pooling/convolution kernel size of each level.
            norm: normalisation after each conv ("", "BN", "GN", ...).
        """
        super().__init__()
        if not kernel_sizes or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(
                f"Pyramid kernel sizes must be odd and positive, got {list(kernel_sizes)}"
            )
        level_channels = max(in_channels // len(kernel_sizes), 1)
        self.levels = nn.ModuleList()
        for k in kernel_sizes:
            layers = []
            if k > 1:
                layers.append(nn.AvgPool2d(k, stride=1, padding=k // 2, count_include_pad=False))
            layers.append(_conv(in_channels, level_channels, 1, norm))
            if k > 1:
                layers.append(_conv(level_channels, level_channels, k, norm))
            self.levels.append(nn.Sequential(*layers))
        self.fuse = _conv(in_channels + level_channels * len(kernel_sizes), in_channels, 1, norm)
        self.out_channels = in_channels
        self.level_channels = level_channels

    def forward(self, x):
        reductions = self._reductions()
        if runs_fused(self) and all(r.folds_norm() for r in reductions):
            return self._forward_with_one_reduction(x, reductions)
        return self.fuse(cat([x] + [level(x) for level in self.levels], dim=1))

    def _reductions(self):
        """Each level's 1x1 convolution to 1/N of the channels."""
        return [next(m for m in level if isinstance(m, FusedConv2d)) for level in self.levels]

    def _forward_with_one_reduction(self, x, reductions):
        """Inference: the levels' 1x1 reductions as one convolution of ``x``, before the pooling.

        A 1x1 convolution with its batch norm folded in is the same affine map at every
        position, and an average pooling that leaves the padding out weighs positions with
        weights summing to one, so the two commute; the reduction's ReLU then follows the
        pooling. One convolution instead of N, and the poolings average 1/N of the channels.
        The outputs are the same up to float rounding.
        """
        sources = [t for r in reductions for t in r.weight_sources()]
        weight, bias = derived_tensors(self, "_reduction_weights", sources, lambda: (
            channels_last_on_cpu(torch.cat([r.inference_weights()[0] for r in reductions])),
            torch.cat([r.inference_weights()[1] for r in reductions]),
        ))
        reduced = F.conv2d(x, weight, bias).split(self.level_channels, dim=1)
        levels = [x]
        for level, part in zip(self.levels, reduced):
            pool = level[0] if isinstance(level[0], nn.AvgPool2d) else None
            part = F.relu(part if pool is None else pool(part))
            for layer in list(level)[2 if pool is not None else 1 :]:
                part = layer(part)
            levels.append(part)
        return self.fuse(cat(levels, dim=1))


@REFINER_REGISTRY.register()
class AlexNet(nn.Module):
    """AlexNet (conv1-conv5, pool5, fc6, fc7) for one-channel crops: Table III's baseline.

    Subclasses insert a :class:`SpatialPyramidModule` after conv5 or pool5 (``pyramid_position``).
    Eq. 4 says fc7 feeds the pyramid, but fc7 is a vector on which 3x3 and 5x5 pooling has no
    meaning, while the experiments (Fig. 8, Table III) name the variants by the conv5 / pool5
    feature maps the module follows; we therefore apply the module to those maps, and fc6/fc7
    follow it. An adaptive average pool to 6x6 before fc6 lets one network take any crop side
    from 64 px (where pool5 is 1x1) upwards.
    """

    pyramid_position: Optional[str] = None

    @configurable
    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 2,
        channels: Sequence[int] = ALEXNET_CHANNELS,
        fc_dim: int = 4096,
        dropout: float = 0.5,
        norm: str = "BN",
        pyramid_levels: Sequence[int] = (1, 3, 5),
    ):
        """
        Args:
            in_channels: channels of the input crops (1 for grayscale ultrasound).
            num_classes: number of logits (benign, malignant).
            channels: output channels of conv1..conv5.
            fc_dim: width of fc6 and fc7.
            dropout: dropout probability before fc6, fc7 (as in AlexNet).
            norm: normalisation after each conv ("", "BN", "GN", ...).
            pyramid_levels: kernel sizes of the spatial pyramid levels (pyramid variants only).
        """
        super().__init__()
        if len(channels) != 5:
            raise ValueError(f"AlexNet needs 5 conv widths, got {list(channels)}")
        c1, c2, c3, c4, c5 = channels
        self.conv1 = _conv(in_channels, c1, 11, norm, stride=4, padding=2)
        self.pool1 = nn.MaxPool2d(3, stride=2)
        self.conv2 = _conv(c1, c2, 5, norm)
        self.pool2 = nn.MaxPool2d(3, stride=2)
        self.conv3 = _conv(c2, c3, 3, norm)
        self.conv4 = _conv(c3, c4, 3, norm)
        self.conv5 = _conv(c4, c5, 3, norm)
        self.pool5 = nn.MaxPool2d(3, stride=2)
        if self.pyramid_position is None:
            self.pyramid = None
        elif self.pyramid_position in ("conv5", "pool5"):
            self.pyramid = SpatialPyramidModule(c5, pyramid_levels, norm)
        else:
            raise ValueError(f"Unknown pyramid position {self.pyramid_position!r}")
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.fc6 = nn.Linear(c5 * 36, fc_dim)
        self.fc7 = nn.Linear(fc_dim, fc_dim)
        self.dropout = nn.Dropout(dropout)
        self.cls_score = nn.Linear(fc_dim, num_classes)
        self.feature_dim = fc_dim
        # Small logits: an untrained refiner outputs ~uniform probabilities, so fusion starts as
        # the coarse prediction.
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.constant_(self.cls_score.bias, 0.0)

    @classmethod
    def from_config(cls, cfg, num_classes: int = 2):
        mult = cfg.MODEL.REFINER.WIDTH_MULT
        return {
            "in_channels": model_input_channels(cfg),
            "num_classes": num_classes,
            "channels": [scaled_channels(c, mult) for c in ALEXNET_CHANNELS],
            "fc_dim": cfg.MODEL.REFINER.FC_DIM,
            "dropout": cfg.MODEL.REFINER.DROPOUT,
            "norm": cfg.MODEL.REFINER.NORM,
            "pyramid_levels": cfg.MODEL.REFINER.PYRAMID_LEVELS,
        }

    def features(self, x):
        """fc7 features (N, fc_dim) of crops x (N, C, S, S), S >= 64."""
        if x.shape[-1] < 64 or x.shape[-2] < 64:
            raise ValueError(
                f"AlexNet refiners need crops of at least 64x64, got {tuple(x.shape[-2:])}"
            )
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = self.conv5(self.conv4(self.conv3(x)))
        if self.pyramid_position == "conv5":
            x = self.pyramid(x)
        x = self.pool5(x)
        if self.pyramid_position == "pool5":
            x = self.pyramid(x)
        if runs_fused(self):
            x = F.relu(self._fc6_at_inference(x))
            return F.relu(inference_linear(self.fc7, x))
        x = F.relu(self.fc6(self.dropout(torch.flatten(self.avgpool(x), 1))))
        return F.relu(self.fc7(self.dropout(x)))

    def _fc6_at_inference(self, x):
        """fc6 on pool5's map (N, C, h, w) through the adaptive pool to 6x6, at inference.

        A map with fewer than 36 positions (crops under ~190 px: 3x3 at 128 px) meets fc6 with
        the pool folded into fc6's weight. The pool only repeats and averages positions, so this
        is the same linear map, up to float rounding, with 36 / (h * w) times fewer weights to
        read, which dominate the refiner's time on a CPU.
        """
        height, width = x.shape[-2:]
        out_h, out_w = _pair(self.avgpool.output_size)
        if height * width >= out_h * out_w:
            return inference_linear(self.fc6, torch.flatten(self.avgpool(x), 1))
        weight = derived_tensors(
            self.fc6, "on_pool5", [self.fc6.weight], lambda: self._fold_pool_into_fc6(x),
            height, width,
        )
        return inference_linear(self.fc6, torch.flatten(x, 1), weight, height, width)

    @torch.no_grad()
    def _fold_pool_into_fc6(self, x):
        """fc6's weight (out, C * 36) as a weight (out, C * h * w) on the unpooled map."""
        channels, height, width = x.shape[1:]
        positions = height * width
        basis = torch.eye(positions, dtype=self.fc6.weight.dtype, device=self.fc6.weight.device)
        pooling = self.avgpool(basis.view(positions, 1, height, width)).flatten(1)  # (hw, 36)
        weight = self.fc6.weight.view(self.fc6.out_features, channels, -1)
        return torch.einsum("ocp,qp->ocq", weight, pooling).reshape(self.fc6.out_features, -1)

    def forward(self, x):
        """Logits (N, num_classes), e.g. over [benign, malignant]."""
        return self.cls_score(self.features(x))


@REFINER_REGISTRY.register()
class AlexNetSPConv5(AlexNet):
    """AlexNet with the spatial pyramid module after conv5: the paper's best refiner."""

    pyramid_position = "conv5"


@REFINER_REGISTRY.register()
class AlexNetSPPool5(AlexNet):
    """AlexNet with the spatial pyramid module after pool5 (Fig. 8's "pool5")."""

    pyramid_position = "pool5"


class _ConvNormReLU(nn.Module):
    """torchvision GoogLeNet's conv block with a configurable norm (its own is fixed BN).

    At inference it runs as one convolution with the batch norm folded in, channels-last on the
    CPU, as :class:`~.fused_inference.FusedConv2d` does for the AlexNets; the Inception blocks'
    concatenations keep the layout.
    """

    def __init__(self, in_channels, out_channels, *, norm="BN", **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=not norm, **kwargs)
        if norm == "BN":
            self.norm = nn.BatchNorm2d(out_channels, eps=1e-3)  # torchvision's setting
        else:
            self.norm = norm_layer(norm, out_channels)

    def forward(self, x):
        if runs_fused(self) and folds_into_conv(self.norm):
            weight, bias = folded_conv_norm(self, self.conv, self.norm)
            c = self.conv
            x = F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)
            return F.relu(x, inplace=True)
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.relu(x, inplace=True)


@REFINER_REGISTRY.register()
class GoogLeNet(nn.Module):
    """torchvision's GoogLeNet (Inception v1), randomly initialised, without auxiliary classifiers,
    taking ``in_channels`` input channels and predicting [benign, malignant].

    GoogLeNet has no fc7: ``features`` returns its 1024-d globally pooled features, and
    ``feature_dim`` is 1024 whatever MODEL.REFINER.FC_DIM says. ``WIDTH_MULT`` does not apply.
    """

    @configurable
    def __init__(
        self, *, in_channels: int = 1, num_classes: int = 2, dropout: float = 0.2, norm: str = "BN"
    ):
        """
        Args:
            in_channels: channels of the input crops.
            num_classes: number of logits.
            dropout: dropout before the classifier.
            norm: normalisation in every conv block ("", "BN", "GN", ...).
        """
        super().__init__()
        conv_block = functools.partial(_ConvNormReLU, norm=norm)
        self.net = _TorchvisionGoogLeNet(
            num_classes=num_classes,
            aux_logits=False,
            transform_input=False,
            init_weights=True,
            blocks=[conv_block, functools.partial(Inception, conv_block=conv_block), InceptionAux],
            dropout=dropout,
        )
        # The stem is rebuilt for grayscale; the classifier moves out so `features` is the
        # network's own forward up to (and including) its dropout.
        self.net.conv1 = conv_block(in_channels, 64, kernel_size=7, stride=2, padding=3)
        nn.init.trunc_normal_(self.net.conv1.conv.weight, std=0.01, a=-2, b=2)
        self.cls_score = self.net.fc
        self.net.fc = nn.Identity()
        self.feature_dim = self.cls_score.in_features

    @classmethod
    def from_config(cls, cfg, num_classes: int = 2):
        return {
            "in_channels": model_input_channels(cfg),
            "num_classes": num_classes,
            "norm": cfg.MODEL.REFINER.NORM,
        }

    def features(self, x):
        """Pooled 1024-d features (N, 1024) of crops x (N, C, S, S)."""
        return self.net(x)

    def forward(self, x):
        """Logits (N, num_classes), e.g. over [benign, malignant]."""
        return self.cls_score(self.features(x))
