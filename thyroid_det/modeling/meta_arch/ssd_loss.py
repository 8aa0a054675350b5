"""SSD's multibox loss: anchors labelled by IoU, smooth-L1 (or an IoU-type loss) on positives, and
cross-entropy on positives and hard negatives (or RetinaNet's sigmoid focal loss on every anchor
not ignored)."""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.modeling.box_regression import Box2BoxTransform, _dense_box_regression_loss
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Boxes, Instances, pairwise_iou
from fvcore.nn import sigmoid_focal_loss_jit
from torch import Tensor
from torch.nn import functional as F

from ..atss_matcher import ATSSMatcher
from ..class_weights import check_class_weights

__all__ = [
    "BOX_REG_LOSS_TYPES",
    "build_anchor_matcher",
    "hard_negative_mask",
    "label_anchors",
    "multibox_loss",
]

# The box losses detectron2's dense detectors support (``_dense_box_regression_loss``).
BOX_REG_LOSS_TYPES = ("smooth_l1", "giou", "diou", "ciou")


def build_anchor_matcher(cfg, num_cell_anchors: List[int]):
    """``MODEL.SSD.MATCHER``: "iou", detectron2's ``Matcher`` at ``IOU_THRESHOLDS`` (each nodule
    also keeps its best anchor), or "atss", :class:`ATSSMatcher` with ``ATSS_TOPK`` locations per
    level (``num_cell_anchors``: the anchor generator's anchors per location on each level)."""
    name = cfg.MODEL.SSD.MATCHER
    if name == "iou":
        return Matcher(
            cfg.MODEL.SSD.IOU_THRESHOLDS, cfg.MODEL.SSD.IOU_LABELS, allow_low_quality_matches=True
        )
    if name == "atss":
        return ATSSMatcher(cfg.MODEL.SSD.ATSS_TOPK, num_cell_anchors)
    raise ValueError(f"MODEL.SSD.MATCHER {name!r}: expected 'iou' or 'atss'")


@torch.no_grad()
def label_anchors(
    anchors: List[Boxes],
    gt_instances: List[Instances],
    anchor_matcher: Union[Matcher, ATSSMatcher],
    num_classes: int,
) -> Tuple[Tensor, Tensor]:
    """Match anchors to ground truth.

    Args:
        anchors: per-level anchors, concatenated into R.
        gt_instances: per image, gt_boxes and gt_classes in the anchors' frame.
        anchor_matcher: labels anchors 1 (foreground), 0 (background) or -1 (ignored): a
            detectron2 ``Matcher`` from the IoU matrix, or an :class:`ATSSMatcher` from the
            boxes.
        num_classes: foreground classes C; C is the background label.

    Returns:
        gt_labels: (N, R) in {-1 (ignore), 0..C-1 (class), C (background)}.
        matched_gt_boxes: (N, R, 4); meaningful only where the label is a class.
    """
    if isinstance(anchor_matcher, Matcher):
        return _label_anchors_batched(Boxes.cat(anchors), gt_instances, anchor_matcher, num_classes)
    level_anchors, anchors = anchors, Boxes.cat(anchors)
    labels, matched_boxes = [], []
    for gt in gt_instances:
        matched_idxs, anchor_labels = anchor_matcher(gt.gt_boxes, level_anchors)
        if len(gt) > 0:
            gt_labels = gt.gt_classes[matched_idxs].clone()
            gt_labels[anchor_labels == 0] = num_classes
            gt_labels[anchor_labels == -1] = -1
            boxes = gt.gt_boxes.tensor[matched_idxs]
        else:
            gt_labels = torch.full_like(matched_idxs, num_classes)
            boxes = torch.zeros_like(anchors.tensor)
        labels.append(gt_labels)
        matched_boxes.append(boxes)
    return torch.stack(labels), torch.stack(matched_boxes)


def _label_anchors_batched(
    anchors: Boxes, gt_instances: List[Instances], matcher: Matcher, num_classes: int
) -> Tuple[Tensor, Tensor]:
    """:func:`label_anchors` with detectron2's ``Matcher`` rules applied to the whole batch at
    once: one IoU matrix of every nodule in the batch against the anchors, padded per image to
    the most nodules any image has (padding: IoU -1, never a match).

    The same labels and boxes as calling the matcher image by image, in a few dozen operations
    and without host-device synchronisation, where the per-image loop took about a hundred
    operations per image and several synchronisations (matcher's assertion, ``nonzero``,
    boolean indexing): at batch 32 on a GPU that loop, not the network, bounded the step.
    """
    device = anchors.tensor.device
    counts = [len(gt) for gt in gt_instances]
    num_images, most = len(counts), max(counts + [1])
    # (image, slot) of every nodule, built on the host and sent in one asynchronous copy.
    slots = [(i, j) for i, n in enumerate(counts) for j in range(n)]
    image_idx, slot_idx = (
        torch.tensor(slots, dtype=torch.long).reshape(-1, 2).T.to(device, non_blocking=True)
    )
    gt_boxes = Boxes.cat([gt.gt_boxes for gt in gt_instances])
    gt_classes = torch.cat([gt.gt_classes for gt in gt_instances])

    iou = anchors.tensor.new_full((num_images, most, len(anchors)), -1.0)
    iou[image_idx, slot_idx] = pairwise_iou(gt_boxes, anchors)
    padded_boxes = anchors.tensor.new_zeros((num_images, most, 4))
    padded_boxes[image_idx, slot_idx] = gt_boxes.tensor
    padded_classes = torch.full((num_images, most), num_classes, device=device)
    padded_classes[image_idx, slot_idx] = gt_classes
    real = torch.zeros((num_images, most), dtype=torch.bool, device=device)
    real[image_idx, slot_idx] = True

    # Matcher.__call__: each anchor's best nodule, labelled by the IoU band it falls in.
    matched_vals, matches = iou.max(dim=1)
    match_labels = torch.ones_like(matches, dtype=torch.int8)
    thresholds = matcher.thresholds
    for label, low, high in zip(matcher.labels, thresholds[:-1], thresholds[1:]):
        match_labels.masked_fill_((matched_vals >= low) & (matched_vals < high), label)
    if matcher.allow_low_quality_matches:
        # Matcher.set_low_quality_matches_: each nodule's best anchors (ties included) are
        # foreground, still matched to their own best nodule.
        best = iou.max(dim=2, keepdim=True).values
        match_labels.masked_fill_(((iou == best) & real[:, :, None]).any(dim=1), 1)

    gt_labels = padded_classes.gather(1, matches)
    gt_labels = gt_labels.masked_fill(match_labels == 0, num_classes)
    gt_labels = gt_labels.masked_fill(match_labels == -1, -1)
    # An image without nodules is all background, whatever the lowest band's label.
    gt_labels = gt_labels.masked_fill(~real.any(dim=1, keepdim=True), num_classes)
    boxes = padded_boxes.gather(1, matches[:, :, None].expand(-1, -1, 4))
    return gt_labels, boxes


@torch.no_grad()
def hard_negative_mask(
    loss: Tensor, negatives: Tensor, num_pos: Tensor, neg_pos_ratio: float
) -> Tensor:
    """Per image, the ``neg_pos_ratio * num_pos`` negatives with the largest loss.

    Args:
        loss: (N, R) classification loss of every anchor.
        negatives: (N, R) bool, anchors labelled background.
        num_pos: (N,) positives per image.
        neg_pos_ratio: negatives kept per positive.

    Returns:
        (N, R) bool mask of the selected negatives.
    """
    num_neg = torch.minimum((num_pos.float() * neg_pos_ratio).long(), negatives.sum(dim=1))
    ranked = loss.masked_fill(~negatives, float("-inf"))
    rank = ranked.argsort(dim=1, descending=True).argsort(dim=1)
    return rank < num_neg[:, None]


def _anchor_class_weights(
    gt_labels: Tensor, positives: Tensor, class_weights: Sequence[float], num_classes: int
) -> Optional[Tensor]:
    """(N, R) weight of each anchor's classification loss: its class's weight on positives, 1
    elsewhere; None when there are no class weights."""
    class_weights = check_class_weights(class_weights, num_classes)
    if not class_weights:
        return None
    weights = torch.tensor(class_weights).to(gt_labels.device, non_blocking=True)
    per_class = weights[gt_labels.clamp(0, num_classes - 1)]
    return torch.where(positives, per_class, torch.ones_like(per_class))


def multibox_loss(
    anchors: Tensor,
    logits: Tensor,
    deltas: Tensor,
    gt_labels: Tensor,
    gt_boxes: Tensor,
    *,
    num_classes: int,
    box2box_transform: Box2BoxTransform,
    cls_loss_type: str,
    neg_pos_ratio: float,
    focal_loss_alpha: float,
    focal_loss_gamma: float,
    smooth_l1_beta: float,
    box_reg_loss_type: str = "smooth_l1",
    box_reg_loss_weight: float = 1.0,
    class_weights: Sequence[float] = (),
) -> Dict[str, Tensor]:
    """SSD's multibox loss of a batch.

    Args:
        anchors: (R, 4) anchors of all levels.
        logits, deltas: (N, R, K) class logits and (N, R, 4) box deltas.
        gt_labels, gt_boxes: (N, R) labels and (N, R, 4) matched boxes, from :func:`label_anchors`.
        num_classes, box2box_transform, cls_loss_type, neg_pos_ratio, focal_loss_alpha,
        focal_loss_gamma, smooth_l1_beta, box_reg_loss_type, box_reg_loss_weight: as
        :class:`MultiScaleSSD` takes them.

    Returns:
        "loss_cls" and "loss_box_reg" (the box loss over positives, times its weight), both
        divided by the batch's positives (at least 1). "softmax_mined": cross-entropy over
        positives and hard negatives, so an image without nodules has no positives, hence no
        negatives, and adds nothing; "sigmoid_focal": focal loss over every anchor that is not
        ignored. With ``class_weights``, each positive anchor's classification loss is
        multiplied by its class's weight; background and the mining ranks are unweighted.
    """
    positives = (gt_labels >= 0) & (gt_labels < num_classes)
    anchor_weights = _anchor_class_weights(gt_labels, positives, class_weights, num_classes)
    negatives = gt_labels == num_classes
    num_pos = positives.sum(dim=1)
    normalizer = num_pos.sum().clamp(min=1).to(logits.dtype)

    # The batch as one image of N * R anchors: detectron2's loss then encodes the targets in one
    # call rather than one per image (each with a host-device synchronisation).
    num_images = gt_labels.shape[0]
    loss_box_reg = _dense_box_regression_loss(
        [Boxes(anchors.repeat(num_images, 1))],
        box2box_transform,
        [deltas.reshape(1, -1, 4)],
        [gt_boxes.reshape(-1, 4)],
        positives.reshape(1, -1),
        box_reg_loss_type=box_reg_loss_type,
        smooth_l1_beta=smooth_l1_beta,
    )

    if cls_loss_type == "sigmoid_focal":
        valid = gt_labels >= 0
        # one-hot over num_classes + 1, background column dropped
        targets = F.one_hot(gt_labels[valid], num_classes + 1)[:, :-1].to(logits.dtype)
        loss_cls = sigmoid_focal_loss_jit(
            logits[valid],
            targets,
            alpha=focal_loss_alpha,
            gamma=focal_loss_gamma,
            reduction="none",
        )
        if anchor_weights is not None:
            loss_cls = loss_cls * anchor_weights[valid][:, None]
        loss_cls = loss_cls.sum()
    else:
        ce = F.cross_entropy(
            logits.flatten(0, 1), gt_labels.clamp(min=0).flatten(), reduction="none"
        ).view_as(gt_labels)
        selected = positives | hard_negative_mask(ce.detach(), negatives, num_pos, neg_pos_ratio)
        if anchor_weights is not None:
            ce = ce * anchor_weights
        # A sum under a mask, not over ce[selected]: boolean indexing would synchronise.
        loss_cls = torch.where(selected, ce, torch.zeros_like(ce)).sum()

    return {
        "loss_cls": loss_cls / normalizer,
        "loss_box_reg": loss_box_reg * box_reg_loss_weight / normalizer,
    }
