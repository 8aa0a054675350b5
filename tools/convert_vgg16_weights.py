#!/usr/bin/env python
"""Convert a torchvision VGG-16 state dict into a detectron2 checkpoint for VGG16SSD.

Input: a local ``.pth`` with ``torchvision.models.vgg16(weights=...).state_dict()`` (download it
where the internet is reachable: ``torch.save(vgg16(weights="IMAGENET1K_V1").state_dict(), f)``).
Output: a ``.pkl`` in detectron2's model-zoo format ({"model": numpy arrays, "__author__": ...}),
loaded with ``MODEL.WEIGHTS``; its keys are those of ``MultiScaleSSD.backbone``.

What is converted:

* conv1_1 .. conv5_3: copied. For a 1-channel model conv1_1 is folded over RGB: torchvision's
  VGG sees ``(x / 255 - m_c) / s_c`` per RGB channel c (ImageNet mean m, std s), while thyroid_det
  feeds ``(x - PIXEL_MEAN) / PIXEL_STD`` once. With a grayscale image as R = G = B, the weights
  ``W' = sum_c W_c * PIXEL_STD / (255 s_c)`` and bias ``b' = b + sum_c W_c (PIXEL_MEAN / 255 - m_c)
  / s_c`` (summed over the kernel) make conv1_1 respond exactly as the ImageNet net does away from
  the zero-padded border, so the pretrained features survive the change of normalisation.
  ``--no-fold`` only sums W over RGB.
* fc6, fc7: SSD's reduced layers: fc6 (4096 x 512*7*7) as a 7x7 kernel decimated to 1024 outputs
  (every 4th) and 3x3 taps (every 3rd: 0, 3, 6), used with dilation 6; fc7 (4096 x 4096) to
  1024 x 1024 (every 4th input and output). Biases follow their outputs.
* conv4_3's L2-norm scale, GN/BN layers, the extra levels and the heads are not in VGG-16: they
  keep their initialisation (checkpoint loading reports them as missing).

Only a full-width net (MODEL.VGG.WIDTH_MULT 1.0) can load the result.

Example:
    python tools/convert_vgg16_weights.py vgg16-397923af.pth vgg16_ssd_gray.pkl
    python tools/train_net.py --config-file configs/mssd_vgg16.yaml MODEL.WEIGHTS vgg16_ssd_gray.pkl
"""

import argparse
import pickle
import re
import sys

import numpy as np
import torch

from thyroid_det.utils.cli import cli_errors
from thyroid_det.utils.file_io import atomic_path

# torchvision ImageNet normalisation (RGB, images in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# VGG16SSD's conv names in order; torchvision numbers them by position in ``features``.
CONV_NAMES = [
    "conv1.0", "conv1.1",
    "conv2.0", "conv2.1",
    "conv3.0", "conv3.1", "conv3.2",
    "conv4.0", "conv4.1", "conv4.2",
    "conv5.0", "conv5.1", "conv5.2",
]  # fmt: skip


class ConversionError(ValueError):
    """The input is not a torchvision VGG-16 state dict; the message names the file."""


def fold_first_conv(weight, bias, in_channels, pixel_mean, pixel_std, fold=True):
    """conv1_1 (64, 3, 3, 3) for ``in_channels`` = 1 (see the module doc) or 3 (unchanged)."""
    if in_channels == 3:
        return weight, bias
    if in_channels != 1:
        raise ValueError(f"Only 1- or 3-channel inputs can be converted, got {in_channels}")
    if not fold:
        return weight.sum(axis=1, keepdims=True), bias
    weight, bias = weight.astype(np.float64), bias.astype(np.float64)
    mean, std = float(pixel_mean[0]), float(pixel_std[0])
    per_channel = np.asarray(IMAGENET_STD, dtype=np.float64).reshape(1, 3, 1, 1)
    shift = (mean / 255.0 - np.asarray(IMAGENET_MEAN).reshape(1, 3, 1, 1)) / per_channel
    new_weight = (weight * std / (255.0 * per_channel)).sum(axis=1, keepdims=True)
    new_bias = bias + (weight * shift).sum(axis=(1, 2, 3))
    return new_weight.astype(np.float32), new_bias.astype(np.float32)


def convert(state_dict, in_channels=1, pixel_mean=(58.6,), pixel_std=(50.2,), fold=True):
    """torchvision VGG-16 state dict -> {VGG16SSD key (with "backbone." prefix): ndarray}.

    Returns:
        model (dict), skipped (list of source keys that were not used).
    """
    arrays = {k: v.detach().cpu().float().numpy() for k, v in state_dict.items()}
    conv_ids = sorted(
        int(m.group(1))
        for k, v in arrays.items()
        if (m := re.fullmatch(r"features\.(\d+)\.weight", k)) and v.ndim == 4
    )
    if len(conv_ids) != len(CONV_NAMES):
        raise ConversionError(
            f"expected the 13 conv layers of VGG-16 under features.*, found {len(conv_ids)}"
        )
    for key in ("classifier.0.weight", "classifier.3.weight"):
        if key not in arrays:
            raise ConversionError(f"missing {key} (fc6/fc7 of VGG-16)")

    model, used = {}, set()
    for i, (idx, name) in enumerate(zip(conv_ids, CONV_NAMES)):
        weight, bias = arrays[f"features.{idx}.weight"], arrays[f"features.{idx}.bias"]
        if i == 0:
            weight, bias = fold_first_conv(weight, bias, in_channels, pixel_mean, pixel_std, fold)
        model[f"backbone.{name}.weight"] = weight
        model[f"backbone.{name}.bias"] = bias
        used.update({f"features.{idx}.weight", f"features.{idx}.bias"})

    fc6_w, fc6_b = arrays["classifier.0.weight"], arrays["classifier.0.bias"]
    if fc6_w.shape != (4096, 512 * 7 * 7):
        raise ConversionError(
            f"classifier.0.weight has shape {fc6_w.shape}, expected (4096, 25088)"
        )
    model["backbone.fc6.weight"] = fc6_w.reshape(4096, 512, 7, 7)[::4, :, ::3, ::3]
    model["backbone.fc6.bias"] = fc6_b[::4]
    fc7_w, fc7_b = arrays["classifier.3.weight"], arrays["classifier.3.bias"]
    model["backbone.fc7.weight"] = fc7_w[::4, ::4].reshape(1024, 1024, 1, 1)
    model["backbone.fc7.bias"] = fc7_b[::4]
    used.update(
        {"classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias"}
    )

    model = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in model.items()}
    return model, sorted(set(arrays) - used)


def write_checkpoint(model, path):
    """Write ``model`` as a detectron2 model-zoo ``.pkl`` (temp file, then rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump({"model": model, "__author__": "thyroid_det convert_vgg16_weights"}, f)


@cli_errors("convert_vgg16_weights.py")
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="torchvision vgg16 state dict (.pth)")
    parser.add_argument("output", help="detectron2 checkpoint to write (.pkl)")
    parser.add_argument("--in-channels", type=int, default=1, help="model input channels (1 or 3)")
    parser.add_argument(
        "--pixel-mean", type=float, nargs="+", default=[58.6], help="MODEL.PIXEL_MEAN"
    )
    parser.add_argument(
        "--pixel-std", type=float, nargs="+", default=[50.2], help="MODEL.PIXEL_STD"
    )
    parser.add_argument("--no-fold", action="store_true", help="sum conv1_1 over RGB only")
    args = parser.parse_args(argv)

    if not args.output.endswith(".pkl"):
        parser.error(f"{args.output}: the output must end in .pkl (detectron2's model-zoo format)")
    try:
        state_dict = torch.load(args.input, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unreadable file: say which and why)
        raise SystemExit(f"Cannot read {args.input}: {e}") from None
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict):
        raise SystemExit(f"{args.input}: not a state dict")
    try:
        model, skipped = convert(
            state_dict, args.in_channels, args.pixel_mean, args.pixel_std, fold=not args.no_fold
        )
    except ConversionError as e:
        raise SystemExit(f"{args.input}: {e}") from None

    write_checkpoint(model, args.output)
    print(f"Wrote {len(model)} tensors to {args.output}:")
    for key, value in model.items():
        print(f"  {key:<28} {tuple(value.shape)}")
    if skipped:
        print(f"Not used: {', '.join(skipped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
