"""ATSS's adaptive anchor assignment (Zhang et al., "Bridging the Gap Between Anchor-based and
Anchor-free Detection via Adaptive Training Sample Selection", CVPR 2020), as an alternative to
a fixed IoU threshold for Ec (``MODEL.SSD.MATCHER "atss"``)."""
from typing import List, Sequence, Tuple

import torch
from detectron2.structures import Boxes, pairwise_iou
from torch import Tensor

__all__ = ["ATSSMatcher"]


class ATSSMatcher:
    """Per ground-truth box, the anchors at the ``topk`` locations of each level whose centres lie
    closest to its centre are candidates (``topk`` times the level's anchors per location, as
    ATSS's own code counts them); those whose IoU with it reaches the candidates' mean + standard
    deviation, and whose centre lies inside it, are its positives. An anchor claimed by several
    boxes goes to the one it overlaps most. Every other anchor is background: nothing is
    ignored, and the threshold adapts to each box's size and shape instead of a fixed IoU.

    Returns what detectron2's ``Matcher`` returns, from the boxes themselves rather than their
    IoU matrix, so that :func:`~.meta_arch.ssd_loss.label_anchors` labels with either.
    """

    def __init__(self, topk: int = 9, anchors_per_location: Sequence[int] = (1,)):
        """
        Args:
            topk: candidate locations per level (ATSS: 9).
            anchors_per_location: anchors per location on each level (the anchor generator's
                ``num_cell_anchors``); one value serves every level.
        """
        if topk < 1:
            raise ValueError(f"MODEL.SSD.ATSS_TOPK must be >= 1, got {topk}")
        self.topk = topk
        self.anchors_per_location = list(anchors_per_location)

    @torch.no_grad()
    def __call__(self, gt_boxes: Boxes, anchors: List[Boxes]) -> Tuple[Tensor, Tensor]:
        """
        Args:
            gt_boxes: G ground-truth boxes of one image.
            anchors: per-level anchors (concatenated, they index R).

        Returns:
            matched_idxs: (R,) the ground-truth box each anchor is matched to (0 where none).
            labels: (R,) int8, 1 foreground, 0 background.
        """
        all_anchors = Boxes.cat(anchors)
        num_anchors = len(all_anchors)
        device = all_anchors.tensor.device
        if len(gt_boxes) == 0:
            zeros = torch.zeros(num_anchors, dtype=torch.int64, device=device)
            return zeros, zeros.to(torch.int8)
        iou = pairwise_iou(gt_boxes, all_anchors)  # (G, R)
        anchor_centers = all_anchors.get_centers()
        candidates = self.candidates(gt_boxes, anchors)  # (G, K)
        candidate_iou = iou.gather(1, candidates)
        # mean + (sample) standard deviation; one candidate alone has no deviation
        threshold = candidate_iou.mean(dim=1) + candidate_iou.std(dim=1).nan_to_num(0)
        x, y = anchor_centers[candidates].unbind(dim=-1)  # (G, K) each
        box = gt_boxes.tensor[:, None, :]
        inside = (x > box[..., 0]) & (y > box[..., 1]) & (x < box[..., 2]) & (y < box[..., 3])
        positive = torch.zeros_like(iou, dtype=torch.bool)
        positive.scatter_(1, candidates, (candidate_iou >= threshold[:, None]) & inside)
        best_iou, matched_idxs = iou.masked_fill(~positive, -1.0).max(dim=0)
        labels = (best_iou >= 0).to(torch.int8)
        return matched_idxs, labels

    def candidates(self, gt_boxes: Boxes, anchors: List[Boxes]) -> Tensor:
        """(G, K) indices into the concatenated anchors: per box and level, the anchors at the
        ``topk`` locations nearest the box's centre."""
        per_location = self.anchors_per_location
        if len(per_location) == 1:
            per_location = per_location * len(anchors)
        if len(per_location) != len(anchors):
            raise ValueError(
                f"ATSSMatcher: anchors per location given for {len(per_location)} levels, "
                f"the anchors come in {len(anchors)}"
            )
        centers = gt_boxes.get_centers()
        candidates, start = [], 0
        for level, per_loc in zip(anchors, per_location):
            distance = torch.cdist(centers, level.get_centers())  # (G, R_level)
            k = min(self.topk * per_loc, len(level))
            candidates.append(distance.topk(k, dim=1, largest=False).indices + start)
            start += len(level)
        return torch.cat(candidates, dim=1)

    def __repr__(self):
        return f"ATSSMatcher(topk={self.topk}, anchors_per_location={self.anchors_per_location})"
