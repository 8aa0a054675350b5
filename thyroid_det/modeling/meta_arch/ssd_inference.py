"""SSD's inference on one image: decode the boxes, threshold, keep the top candidates, NMS."""
from typing import Tuple

import torch
from detectron2.layers import batched_nms, nonzero_tuple
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances
from torch import Tensor

__all__ = ["ssd_inference_single_image"]


def ssd_inference_single_image(
    anchors: Tensor,
    fg_probs: Tensor,
    deltas: Tensor,
    image_size: Tuple[int, int],
    *,
    box2box_transform: Box2BoxTransform,
    score_thresh: float,
    topk_candidates: int,
    nms_thresh: float,
    class_agnostic_nms: bool,
    max_detections_per_image: int,
) -> Instances:
    """Decode, threshold, keep the top candidates and apply NMS, for one image.

    Args:
        anchors: (R, 4) anchors of all levels.
        fg_probs: (R, C) foreground class probabilities.
        deltas: (R, 4) box deltas.
        image_size: (H, W) the boxes are clipped to.
        box2box_transform, score_thresh, topk_candidates, nms_thresh, class_agnostic_nms,
        max_detections_per_image: as :class:`MultiScaleSSD` takes them (``test_*``).

    Returns:
        Instances with pred_boxes, scores (foreground probability of pred_classes),
        pred_classes and class_probs (foreground probabilities renormalised to sum to 1:
        p(class | nodule)).
    """
    if class_agnostic_nms:
        scores, classes = fg_probs.max(dim=1)
        anchor_idxs = nonzero_tuple(scores > score_thresh)[0]
        scores, classes = scores[anchor_idxs], classes[anchor_idxs]
    else:
        anchor_idxs, classes = nonzero_tuple(fg_probs > score_thresh)
        scores = fg_probs[anchor_idxs, classes]
    # sort and slice rather than topk(min(k, numel)): the same candidates, and a traced
    # model (detectron2.export) keeps working when fewer than k pass the threshold.
    scores, order = scores.sort(descending=True, stable=True)
    scores, order = scores[:topk_candidates], order[:topk_candidates]
    anchor_idxs, classes = anchor_idxs[order], classes[order]

    boxes = Boxes(box2box_transform.apply_deltas(deltas[anchor_idxs], anchors[anchor_idxs]))
    class_probs = fg_probs[anchor_idxs]
    class_probs = class_probs / class_probs.sum(dim=1, keepdim=True).clamp(min=1e-12)

    # non-finite boxes go before clip(), which asserts that every box is finite
    finite = torch.isfinite(boxes.tensor).all(dim=1) & torch.isfinite(scores)
    boxes, scores, classes, class_probs = (
        boxes[finite],
        scores[finite],
        classes[finite],
        class_probs[finite],
    )
    boxes.clip(image_size)
    nonempty = boxes.nonempty()
    boxes, scores, classes, class_probs = (
        boxes[nonempty],
        scores[nonempty],
        classes[nonempty],
        class_probs[nonempty],
    )
    nms_groups = torch.zeros_like(classes) if class_agnostic_nms else classes
    keep = batched_nms(boxes.tensor, scores, nms_groups, nms_thresh)
    keep = keep[:max_detections_per_image]

    result = Instances(image_size)
    result.pred_boxes = boxes[keep]
    result.scores = scores[keep]
    result.pred_classes = classes[keep]
    result.class_probs = class_probs[keep]
    return result
