"""What a thyroid_det model does to its input before the backbone: grayscale (luma) conversion
and the resize to the fixed network input size.

Both live in the model so that any caller that hands it a BGR image, detectron2's
``DefaultPredictor`` included, gets the same prediction as the project's own paths.
"""
from typing import Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

__all__ = [
    "LUMA_WEIGHTS",
    "to_luma",
    "luma_statistic",
    "luma_enabled",
    "model_input_channels",
    "resize_to",
]

# ITU-R 601 luma weights per channel order, as OpenCV's BGR2GRAY and PIL's convert("L").
LUMA_WEIGHTS = {"BGR": (0.114, 0.587, 0.299), "RGB": (0.299, 0.587, 0.114)}


def to_luma(image: torch.Tensor, input_format: str) -> torch.Tensor:
    """(3, H, W) or (N, 3, H, W) float image in ``input_format`` -> one luma channel. Linear, so
    it commutes with a normalisation whose mean and std are equal in the three channels."""
    weights = image.new_tensor(LUMA_WEIGHTS[input_format]).view(3, 1, 1)
    return (image * weights).sum(dim=-3, keepdim=True)


def luma_statistic(values: Sequence[float], input_format: str) -> float:
    """One value for the luma channel from per-channel PIXEL_MEAN or PIXEL_STD (their luma-weighted
    sum: exact for the equal values of grayscale statistics)."""
    if len(values) == 1:
        return float(values[0])
    return float(sum(w * v for w, v in zip(LUMA_WEIGHTS[input_format], values)))


def luma_enabled(cfg) -> bool:
    """Whether thyroid_det's parts convert BGR/RGB input to one luma channel (MODEL.LUMA_INPUT)."""
    return bool(cfg.MODEL.LUMA_INPUT) and cfg.INPUT.FORMAT in LUMA_WEIGHTS


def model_input_channels(cfg) -> int:
    """Channels that thyroid_det's networks (MultiScaleSSD's backbone, the refiners) take:
    1 under :func:`luma_enabled`, else ``len(MODEL.PIXEL_MEAN)``. detectron2's own
    meta-architectures build their backbones with ``len(MODEL.PIXEL_MEAN)`` regardless."""
    return 1 if luma_enabled(cfg) else len(cfg.MODEL.PIXEL_MEAN)


def resize_to(image: torch.Tensor, size: Optional[Tuple[int, int]]) -> torch.Tensor:
    """(C, H, W) or (N, C, H, W) float image(s) resized to ``size`` (bilinear, antialiased when
    shrinking, which is what PIL's bilinear resize in the data mapper does); unchanged when
    already that size. Under ``torch.jit.trace`` the resize is always recorded (at the same size
    it is the identity), so a traced model takes inputs of any size."""
    if size is None or (tuple(image.shape[-2:]) == tuple(size) and not torch.jit.is_tracing()):
        return image
    batch = image if image.dim() == 4 else image[None]
    batch = F.interpolate(
        batch, size=tuple(size), mode="bilinear", align_corners=False, antialias=True
    )
    return batch if image.dim() == 4 else batch[0]
