"""SSD's inference: decode the boxes, threshold, keep the top candidates, NMS; for one image,
or for a batch with everything but the NMS done for all images at once."""
from typing import List, Sequence, Tuple

import torch
from detectron2.layers import batched_nms, nonzero_tuple
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, Instances
from torch import Tensor

__all__ = ["ssd_inference_batch", "ssd_inference_single_image"]


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


def ssd_inference_batch(
    anchors: Tensor,
    fg_probs: Tensor,
    deltas: Tensor,
    image_sizes: Sequence[Tuple[int, int]],
    *,
    box2box_transform: Box2BoxTransform,
    score_thresh: float,
    topk_candidates: int,
    nms_thresh: float,
    class_agnostic_nms: bool,
    max_detections_per_image: int,
) -> List[Instances]:
    """:func:`ssd_inference_single_image` of every image of a batch, with the same results: the
    candidates' selection, decoding, clipping and filtering run on the whole batch, and only the
    NMS and the outputs image by image. Image by image, each step issued its own operations and
    several read values back (``nonzero``, boolean indexing), which bounded a GPU's inference
    and the refiner stage's training step by the host.

    Args:
        anchors: (R, 4) anchors of all levels.
        fg_probs: (N, R, C) foreground class probabilities.
        deltas: (N, R, 4) box deltas.
        image_sizes: N (H, W) the boxes are clipped to.
        other arguments: as :func:`ssd_inference_single_image`.
    """
    num_images, num_anchors, num_classes = fg_probs.shape
    if class_agnostic_nms:
        scores, classes = fg_probs.max(dim=2)
    else:
        scores = fg_probs.reshape(num_images, num_anchors * num_classes)
    passed = scores > score_thresh
    # Stable, as the single image's sort of its passing candidates (in anchor, then class,
    # order); candidates that did not pass (-1: below any probability) sort last.
    ranked, order = torch.where(passed, scores, -1.0).sort(dim=1, descending=True, stable=True)
    order, scores = order[:, :topk_candidates], ranked[:, :topk_candidates]
    valid = passed.gather(1, order)
    if class_agnostic_nms:
        anchor_idxs, classes = order, classes.gather(1, order)
    else:
        anchor_idxs, classes = order // num_classes, order % num_classes

    k = anchor_idxs.shape[1]
    boxes = box2box_transform.apply_deltas(
        deltas.gather(1, anchor_idxs[:, :, None].expand(-1, -1, 4)).reshape(-1, 4),
        anchors[anchor_idxs.reshape(-1)],
    ).view(num_images, k, 4)
    class_probs = fg_probs.gather(1, anchor_idxs[:, :, None].expand(-1, -1, num_classes))
    class_probs = class_probs / class_probs.sum(dim=2, keepdim=True).clamp(min=1e-12)

    valid &= torch.isfinite(boxes).all(dim=2) & torch.isfinite(scores)
    # Boxes.clip per image; a non-finite box is already out.
    limits = torch.tensor(
        [[w, h, w, h] for h, w in image_sizes], dtype=boxes.dtype
    ).to(boxes.device, non_blocking=True)[:, None, :]
    boxes = torch.minimum(boxes.clamp(min=0), limits)
    valid &= (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])  # nonempty

    results = []
    for i, image_size in enumerate(image_sizes):
        idxs = nonzero_tuple(valid[i])[0]
        image_boxes, image_scores = boxes[i, idxs], scores[i, idxs]
        image_classes = classes[i, idxs]
        nms_groups = torch.zeros_like(image_classes) if class_agnostic_nms else image_classes
        keep = batched_nms(image_boxes, image_scores, nms_groups, nms_thresh)
        keep = idxs[keep[:max_detections_per_image]]
        result = Instances(tuple(image_size))
        result.pred_boxes = Boxes(boxes[i, keep])
        result.scores = scores[i, keep]
        result.pred_classes = classes[i, keep]
        result.class_probs = class_probs[i, keep]
        results.append(result)
    return results
