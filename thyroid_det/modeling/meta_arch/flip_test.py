"""Horizontal-flip test-time augmentation for a dense detector: the predictions on the mirror
image are mirrored back onto the original anchors and averaged with the original predictions,
anchor by anchor, before decoding and NMS (one set of candidates, not two sets of detections)."""
from typing import List, Sequence, Tuple

import torch
from detectron2.structures import Boxes
from torch import Tensor

__all__ = ["average_probabilities", "check_mirror_symmetric", "mirror_dense_predictions"]


def mirror_dense_predictions(
    level_shapes: Sequence[Tuple[int, int]], per_level: List[Tensor], negate_dx: bool = False
) -> List[Tensor]:
    """Per level, (N, H*W*A, K) predictions in detectron2's (H, W, A) order, made on a mirrored
    image, reordered so that row r holds the prediction for the mirror of anchor r: column
    ``j`` of a level's grid trades places with column ``W - 1 - j``. With ``negate_dx`` the
    first of the K values (a box delta's dx) changes sign, as a mirrored box's centre offset."""
    mirrored = []
    for (height, width), pred in zip(level_shapes, per_level):
        n, rows, k = pred.shape
        pred = pred.view(n, height, width, rows // (height * width), k).flip(2).reshape(n, rows, k)
        if negate_dx:
            pred = torch.cat([-pred[..., :1], pred[..., 1:]], dim=-1)
        mirrored.append(pred)
    return mirrored


def check_mirror_symmetric(
    level_shapes: Sequence[Tuple[int, int]], anchors: List[Boxes], image_width: int
) -> None:
    """Raise ValueError unless every level's anchors map onto themselves under the mirror
    ``x -> image_width - x`` with columns reordered as :func:`mirror_dense_predictions` does
    (SSD's anchors centred in their cells are; detectron2's default offset 0 is not)."""
    for level, ((height, width), boxes) in enumerate(zip(level_shapes, anchors)):
        tensor = boxes.tensor
        (mirrored,) = mirror_dense_predictions([(height, width)], [tensor[None]])
        mirrored = mirrored[0]
        x1, y1, x2, y2 = mirrored.unbind(dim=1)
        mirrored = torch.stack([image_width - x2, y1, image_width - x1, y2], dim=1)
        if not torch.allclose(mirrored, tensor, atol=1e-3 * image_width):
            raise ValueError(
                f"MODEL.SSD.TEST_FLIP: the anchors of feature level {level} are not symmetric "
                "under a horizontal flip, so the mirror image's predictions cannot be averaged "
                "anchor by anchor; anchors centred in their cells "
                "(MODEL.ANCHOR_GENERATOR.OFFSET 0.5) are"
            )


def average_probabilities(logits: Tensor, mirror_logits: Tensor, sigmoid: bool) -> Tensor:
    """Logits whose probabilities are the mean of the two predictions' probabilities (softmax
    over the last dimension, or one sigmoid per value), so that inference reads them as it
    reads any logits."""
    if sigmoid:
        mean = (logits.sigmoid() + mirror_logits.sigmoid()) / 2
        return torch.logit(mean, eps=1e-7)
    mean = (logits.softmax(dim=-1) + mirror_logits.softmax(dim=-1)) / 2
    return mean.clamp(min=1e-30).log()
