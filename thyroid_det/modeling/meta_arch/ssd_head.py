"""SSD's prediction head: per level, a 3x3 convolution for class logits and one for box deltas."""
import math
from typing import List, Tuple

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

__all__ = ["SSDHead"]


class SSDHead(nn.Module):
    """One 3x3 convolution per level for class logits and one for box deltas (SSD's heads).

    Levels have their own weights and input channels, so any backbone's named outputs (VGG-16
    levels, ResNet stages, FPN levels) can feed it.
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        num_anchors: List[int],
        background_logit: bool = True,
        prior_prob: float = 0.0,
    ):
        """
        Args:
            input_shape: shape of each input level.
            num_classes: foreground classes.
            num_anchors: anchors per cell on each level.
            background_logit: predict ``num_classes + 1`` logits per anchor, background last
                (softmax); otherwise ``num_classes`` (one sigmoid per class).
            prior_prob: if > 0, class biases start at ``-log((1 - p) / p)`` so that every anchor
                starts as foreground with probability ``p`` (RetinaNet's initialisation, which
                keeps the loss of thousands of easy negatives from swamping the first steps).
        """
        super().__init__()
        if len(input_shape) != len(num_anchors):
            raise ValueError(
                f"SSDHead: {len(input_shape)} input levels but anchors for {len(num_anchors)}"
            )
        self.num_classes = num_classes
        num_logits = num_classes + 1 if background_logit else num_classes
        self.cls_score = nn.ModuleList(
            nn.Conv2d(s.channels, a * num_logits, kernel_size=3, padding=1)
            for s, a in zip(input_shape, num_anchors)
        )
        self.bbox_pred = nn.ModuleList(
            nn.Conv2d(s.channels, a * 4, kernel_size=3, padding=1)
            for s, a in zip(input_shape, num_anchors)
        )
        for layer in [*self.cls_score, *self.bbox_pred]:
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
        if prior_prob > 0:
            for layer in self.cls_score:
                nn.init.constant_(layer.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec], num_anchors: List[int]):
        focal = cfg.MODEL.SSD.CLS_LOSS_TYPE == "sigmoid_focal"
        return {
            "input_shape": input_shape,
            "num_classes": cfg.MODEL.SSD.NUM_CLASSES,
            "num_anchors": num_anchors,
            # the focal loss's sigmoids need no background logit, and start at the prior
            "background_logit": not focal,
            "prior_prob": cfg.MODEL.SSD.PRIOR_PROB if focal else 0.0,
        }

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """
        Returns:
            logits, deltas: per level, (N, A*(C+1), H, W) and (N, A*4, H, W).
        """
        if len(features) != len(self.cls_score):
            raise ValueError(f"SSDHead has {len(self.cls_score)} levels, got {len(features)}")
        logits = [conv(f) for conv, f in zip(self.cls_score, features)]
        deltas = [conv(f) for conv, f in zip(self.bbox_pred, features)]
        return logits, deltas
