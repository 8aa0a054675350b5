"""ATSSMatcher: per nodule, the anchors whose IoU beats its candidates' mean + std, centre inside;
and Ec labelling with it (MODEL.SSD.MATCHER atss)."""
import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from thyroid_det.modeling.atss_matcher import ATSSMatcher

from ..conftest import make_cfg


def small_level():
    """8-px anchors centred on an 8-px grid of a 40-px image (25 anchors)."""
    centres = torch.arange(4.0, 40.0, 8.0)
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return Boxes(torch.stack([x - 4, y - 4, x + 4, y + 4], dim=-1).reshape(-1, 4))


LEVELS = [small_level(), Boxes(torch.tensor([[10.0, 10, 30, 30], [30, 30, 50, 50]]))]
SMALL_CENTRE, LARGE_EXACT = 12, 25  # index of the 8-px anchor at (20, 20); the 20-px one


def test_each_nodule_takes_the_anchors_of_its_scale():
    matcher = ATSSMatcher(topk=2)
    large = Boxes(torch.tensor([[10.0, 10, 30, 30]]))
    matched, labels = matcher(large, LEVELS)
    # candidates: two 8-px anchors (IoU 0.16 each), the 20-px ones (IoU 1 and 0); threshold
    # mean + std = 0.33 + 0.45: only the exact 20-px anchor passes.
    assert labels.nonzero().flatten().tolist() == [LARGE_EXACT]
    small = Boxes(torch.tensor([[16.0, 16, 24, 24]]))
    _, labels = matcher(small, LEVELS)
    assert labels.nonzero().flatten().tolist() == [SMALL_CENTRE]

    both = Boxes.cat([large, small])
    matched, labels = matcher(both, LEVELS)
    assert labels.nonzero().flatten().tolist() == [SMALL_CENTRE, LARGE_EXACT]
    assert matched[LARGE_EXACT].item() == 0 and matched[SMALL_CENTRE].item() == 1
    assert labels.dtype == torch.int8 and matched.shape == labels.shape == (27,)


def test_centres_outside_the_nodule_are_never_positive():
    # Candidates' IoU 0.16, 0.16 (8-px), 0.29, 0 (20-px): threshold 0.27. The 20-px anchor
    # (10, 10)-(30, 30) passes it, but its centre (20, 20) lies outside the nodule.
    box = Boxes(torch.tensor([[21.0, 10, 41, 30]]))
    _, labels = ATSSMatcher(topk=2)(box, LEVELS)
    assert labels.sum() == 0
    _, labels = ATSSMatcher(topk=2)(Boxes(torch.tensor([[19.0, 10, 39, 30]])), LEVELS)
    assert labels.nonzero().flatten().tolist() == [LARGE_EXACT]  # centre inside: positive


def test_candidates_are_topk_locations_times_anchors_per_location():
    box = Boxes(torch.tensor([[10.0, 10, 30, 30]]))
    assert ATSSMatcher(topk=2).candidates(box, LEVELS).shape == (1, 2 + 2)
    # Level 0 read as 4 anchors per location: 8 candidates there, the 8 nearest the centre.
    wide = ATSSMatcher(topk=2, anchors_per_location=[4, 1])
    candidates = wide.candidates(box, LEVELS)
    assert candidates.shape == (1, 8 + 2)
    centres = Boxes.cat(LEVELS).get_centers()[candidates[0, :8]]
    assert (centres - 20).norm(dim=1).max() <= math.hypot(8, 8) + 1e-4
    assert wide(box, LEVELS)[1].nonzero().flatten().tolist() == [LARGE_EXACT]
    with pytest.raises(ValueError, match="given for 3 levels"):
        ATSSMatcher(topk=2, anchors_per_location=[1, 1, 1])(box, LEVELS)


def test_no_nodules_and_bad_topk():
    matched, labels = ATSSMatcher()(Boxes(torch.zeros(0, 4)), LEVELS)
    assert labels.sum() == 0 and matched.shape == (27,)
    with pytest.raises(ValueError, match="ATSS_TOPK"):
        ATSSMatcher(0)


def test_ec_labels_with_atss():
    cfg = make_cfg("mssd_vgg16.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.VGG.WIDTH_MULT = 1 / 16
    cfg.MODEL.SSD.MATCHER = "atss"
    cfg.MODEL.SSD.ATSS_TOPK = 2
    model = build_model(cfg)
    # ATSS_TOPK locations per level: times the generator's anchors per location.
    assert isinstance(model.anchor_matcher, ATSSMatcher)
    assert model.anchor_matcher.anchors_per_location == model.anchor_generator.num_cell_anchors
    model.anchor_matcher = ATSSMatcher(topk=2)  # the two hand-built levels, one anchor each
    gt = Instances((40, 40))
    gt.gt_boxes = Boxes(torch.tensor([[10.0, 10, 30, 30], [16, 16, 24, 24]]))
    gt.gt_classes = torch.tensor([1, 0])
    labels, boxes = model.label_anchors(LEVELS, [gt])
    expected = torch.full((1, 27), 2)
    expected[0, LARGE_EXACT], expected[0, SMALL_CENTRE] = 1, 0
    assert torch.equal(labels, expected)
    assert boxes[0, SMALL_CENTRE].tolist() == [16, 16, 24, 24]
    with pytest.raises(ValueError, match="MODEL.SSD.MATCHER"):
        cfg.MODEL.SSD.MATCHER = "hungarian"
        build_model(cfg)
