"""torchvision's ImageNet VGG-16 state dict -> :class:`VGG16SSD` weights, converted on load.

``MODEL.WEIGHTS`` may name the file that ``torchvision.models.vgg16(...).state_dict()`` was saved
to; :class:`thyroid_det.engine.Checkpointer` recognises its keys and calls
:func:`convert_imagenet_vgg16` for every :class:`VGG16SSD` in the model. What is converted:

* conv1_1 .. conv5_3 are copied. conv1_1 also takes the model's input: torchvision's VGG sees
  ``(x / 255 - m_c) / s_c`` per RGB channel c (ImageNet mean m, std s), the model
  ``(x - PIXEL_MEAN) / PIXEL_STD``. The filters are rescaled and the bias shifted so that conv1_1
  responds as ImageNet's does away from the zero-padded border, and for a 1-channel (luma)
  backbone the RGB filters are summed, which is exact for a gray image (R = G = B). A 3-channel
  BGR model gets the filters in BGR order.
* fc6, fc7 become SSD's reduced layers (SSD section 3): fc6 (4096 x 512*7*7) read as a 7x7 kernel,
  every 4th output and taps 0, 3, 6 (a 3x3 kernel used with dilation 6); fc7 (4096 x 4096) every
  4th output and input. Biases follow their outputs.
* Not in VGG-16, so left at their initialisation: conv4_3's L2-norm scale, norm layers, the
  extra levels, the heads and any refiner. With norm layers the convolutions have no bias and
  VGG-16's biases are dropped.

Only the published width converts (MODEL.VGG.WIDTH_MULT 1.0).
"""
import re
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from ..model_input import luma_statistic
from .vgg import VGG16SSD

__all__ = ["is_imagenet_vgg16", "convert_imagenet_vgg16", "imagenet_vgg16_model_weights"]

# torchvision's ImageNet normalisation (RGB, images in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# VGG16SSD's convolutions in order; torchvision numbers them by position in ``features``.
CONV_NAMES = (
    "conv1.0", "conv1.1",
    "conv2.0", "conv2.1",
    "conv3.0", "conv3.1", "conv3.2",
    "conv4.0", "conv4.1", "conv4.2",
    "conv5.0", "conv5.1", "conv5.2",
)  # fmt: skip
_FEATURE_WEIGHT = re.compile(r"features\.(\d+)\.weight")


def is_imagenet_vgg16(state_dict: Mapping) -> bool:
    """Whether ``state_dict`` has torchvision's ``vgg16`` layout (``features.N.*`` and the
    ``classifier.0/3`` fully connected layers)."""
    return (
        isinstance(state_dict, Mapping)
        and "features.0.weight" in state_dict
        and "classifier.0.weight" in state_dict
    )


def _first_conv(
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    in_channels: int,
    input_format: str,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ImageNet conv1_1 (64, 3, 3, 3) for a model that normalises with ``pixel_mean/std`` and
    feeds ``in_channels`` (1: luma, 3: ``input_format`` order) to the backbone (module doc)."""
    weight, bias = weight.double(), bias.double()
    imagenet_mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    imagenet_std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    if in_channels == 1:
        mean = torch.full((1, 3, 1, 1), float(pixel_mean[0]), dtype=torch.float64)
        std = torch.full((1, 3, 1, 1), float(pixel_std[0]), dtype=torch.float64)
    elif in_channels == 3:
        rgb = [2, 1, 0] if input_format == "BGR" else [0, 1, 2]  # model channel of R, G, B
        mean = torch.tensor([float(pixel_mean[i]) for i in rgb], dtype=torch.float64)
        std = torch.tensor([float(pixel_std[i]) for i in rgb], dtype=torch.float64)
        mean, std = mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)
    else:
        raise ValueError(f"a {in_channels}-channel input: only 1 (luma) or 3 channels convert")
    # RGB channel c of ImageNet's input is (x_c / 255 - m_c) / s_c = a_c * model_input_c + b_c.
    scale = std / (255.0 * imagenet_std)
    shift = (mean / 255.0 - imagenet_mean) / imagenet_std
    new_bias = bias + (weight * shift).sum(dim=(1, 2, 3))
    new_weight = weight * scale
    if in_channels == 1:
        new_weight = new_weight.sum(dim=1, keepdim=True)
    elif input_format == "BGR":
        new_weight = new_weight.flip(1)
    return new_weight.float(), new_bias.float()


def convert_imagenet_vgg16(
    state_dict: Mapping[str, torch.Tensor],
    backbone: VGG16SSD,
    *,
    input_format: str,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """
    Args:
        state_dict: torchvision ``vgg16`` weights (:func:`is_imagenet_vgg16`).
        backbone: the network they initialise; its conv1_1 fixes the input channels.
        input_format: "BGR" or "RGB": channel order of a 3-channel backbone input.
        pixel_mean, pixel_std: the normalisation the model applies before the backbone (one
            value each for a luma backbone).

    Returns:
        weights: {key of ``backbone.state_dict()``: tensor} for conv1_1 .. conv5_3, fc6, fc7.
        notes: what was done besides copying, for the log.

    Raises:
        ValueError: the backbone is not full-width VGG-16, or ``state_dict`` is not VGG-16.
    """
    width = backbone.conv1[0].weight.shape[0]
    if width != 64 or backbone.fc6.weight.shape[0] != 1024:
        raise ValueError(
            "ImageNet VGG-16 weights need MODEL.VGG.WIDTH_MULT 1.0: this backbone's conv1_1 has "
            f"{width} filters, VGG-16's 64"
        )
    arrays = {k: torch.as_tensor(v) for k, v in state_dict.items()}  # .pkl files hold ndarrays
    conv_ids = sorted(
        int(m.group(1))
        for k, v in arrays.items()
        if (m := _FEATURE_WEIGHT.fullmatch(k)) and v.dim() == 4
    )
    fc6_w, fc7_w = arrays.get("classifier.0.weight"), arrays.get("classifier.3.weight")
    if len(conv_ids) != len(CONV_NAMES) or fc6_w is None or fc7_w is None:
        raise ValueError(
            f"not torchvision's vgg16: {len(conv_ids)} convolutions under features.* (VGG-16: 13)"
            " or no classifier.0/classifier.3"
        )
    if tuple(fc6_w.shape) != (4096, 512 * 7 * 7) or tuple(fc7_w.shape) != (4096, 4096):
        raise ValueError(
            f"fc6/fc7 have shapes {tuple(fc6_w.shape)}, {tuple(fc7_w.shape)}; VGG-16's are "
            "(4096, 25088), (4096, 4096)"
        )
    target = backbone.state_dict()
    in_channels = backbone.conv1[0].weight.shape[1]
    weights, notes = {}, []
    for i, (idx, name) in enumerate(zip(conv_ids, CONV_NAMES)):
        weight, bias = arrays[f"features.{idx}.weight"], arrays[f"features.{idx}.bias"]
        if i == 0:
            weight, bias = _first_conv(
                weight,
                bias,
                in_channels=in_channels,
                input_format=input_format,
                pixel_mean=pixel_mean,
                pixel_std=pixel_std,
            )
        weights[f"{name}.weight"], weights[f"{name}.bias"] = weight, bias
    weights["fc6.weight"] = fc6_w.view(4096, 512, 7, 7)[::4, :, ::3, ::3]
    weights["fc6.bias"] = arrays["classifier.0.bias"][::4]
    weights["fc7.weight"] = fc7_w[::4, ::4].reshape(1024, 1024, 1, 1)
    weights["fc7.bias"] = arrays["classifier.3.bias"][::4]

    channels = "1 luma channel" if in_channels == 1 else f"{input_format} order"
    notes.append(f"conv1_1 folded to {channels} and this model's PIXEL_MEAN/STD")
    notes.append("fc6/fc7 decimated to SSD's 1024-channel dilated fc6 and 1x1 fc7")
    dropped = [k for k in weights if k.endswith(".bias") and k not in target]
    if dropped:
        notes.append(f"{len(dropped)} conv biases dropped (MODEL.VGG.NORM: the convs have none)")
    weights = {k: v.detach().float().contiguous() for k, v in weights.items() if k in target}
    return weights, notes


def imagenet_vgg16_model_weights(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> Tuple[Dict[str, torch.Tensor], str]:
    """Convert ``state_dict`` for every :class:`VGG16SSD` in ``model`` (the Ec backbone, or the
    bottom-up of an FPN), with the model's own input normalisation.

    Returns:
        weights: {key of ``model.state_dict()``: tensor}.
        summary: one line saying what was converted and which modules kept their initialisation.

    Raises:
        ValueError: no VGG16SSD in the model, or :func:`convert_imagenet_vgg16`'s errors.
    """
    model = getattr(model, "module", model)  # DistributedDataParallel
    input_format = getattr(model, "input_format", "BGR")
    mean = [float(v) for v in model.pixel_mean.flatten()] if hasattr(model, "pixel_mean") else []
    std = [float(v) for v in model.pixel_std.flatten()] if hasattr(model, "pixel_std") else []
    weights, notes, targets = {}, [], []
    for prefix, module in model.named_modules():
        if not isinstance(module, VGG16SSD):
            continue
        in_channels = module.conv1[0].weight.shape[1]
        if len(mean) != in_channels and in_channels == 1 and len(mean) == 3:
            mean = [luma_statistic(mean, input_format)]
            std = [luma_statistic(std, input_format)]
        if len(mean) != in_channels:
            raise ValueError(
                f"{prefix or 'the backbone'} takes {in_channels} channels but the model "
                f"normalises {len(mean)}: cannot fold ImageNet's normalisation into conv1_1"
            )
        converted, notes = convert_imagenet_vgg16(
            state_dict, module, input_format=input_format, pixel_mean=mean, pixel_std=std
        )
        weights.update({f"{prefix}.{k}" if prefix else k: v for k, v in converted.items()})
        targets.append(prefix or "the model")
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no VGG16SSD backbone (MODEL.BACKBONE.NAME "
            "build_vgg16_ssd_backbone or build_vgg16_fpn_backbone) to load VGG-16 into"
        )
    kept = sorted({_module_of(k, targets) for k in model.state_dict() if k not in weights})
    summary = (
        f"ImageNet VGG-16 (torchvision) converted into {', '.join(targets)}: conv1_1..conv5_3, "
        f"fc6, fc7 ({'; '.join(notes)}); left at their initialisation: {', '.join(kept)}"
    )
    return weights, summary


def _module_of(key: str, backbone_prefixes: List[str]) -> str:
    """The module a parameter key is reported under: a backbone's direct child (``backbone.extra1``,
    its norm layers as one), else the model's top-level child."""
    for prefix in backbone_prefixes:
        if prefix != "the model" and key.startswith(prefix + "."):
            if ".norm." in key:
                return f"{prefix} norm layers"
            child = key[len(prefix) + 1 :].split(".")[0]
            return f"{prefix}.{child}"
    return key.split(".")[0]
