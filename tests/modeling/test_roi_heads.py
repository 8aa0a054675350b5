"""RefinerROIHeads: crops, fusion, training crops, inference fields, RPN proposals."""
import math
import re

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from thyroid_det.modeling.meta_arch.mccnn import detections_to_proposals
from thyroid_det.modeling.roi_heads.refiner import (
    RefinerROIHeads,
    crop_and_resize,
    fuse_probabilities,
    jitter_boxes,
    square_context_boxes,
)

from ..conftest import make_cfg


class FixedProbs(nn.Module):
    """A refiner stub that predicts the same distribution for every crop."""

    def __init__(self, probs):
        super().__init__()
        self.register_buffer("logits", torch.tensor(probs).log())
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, crops):
        return self.logits.expand(len(crops), -1) + self.dummy


class MeanIntensity(nn.Module):
    """A refiner stub whose malignant logit is the crop's mean intensity."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, crops):
        mean = crops.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(mean), mean], dim=1) + self.dummy


def heads(refiner, **kwargs):
    args = dict(refiner=refiner, num_classes=2, input_size=16, context_margin=0.0, gt_jitter_copies=2, gt_jitter=0.1)
    args.update(kwargs)
    return RefinerROIHeads(**args)


def detections(boxes, scores, classes, class_probs, image_size=(64, 64)):
    """Ec-style detections, as the proposals MCCNN hands the heads."""
    inst = Instances(image_size)
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).view(-1, 4))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
    inst.class_probs = torch.tensor(class_probs, dtype=torch.float32).view(-1, 2)
    return detections_to_proposals([inst])[0]


def targets(boxes, classes, image_size=(64, 64)):
    inst = Instances(image_size)
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).view(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


def ramp_image(h=64, w=64, offset=0.0):
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return (xs + 100 * ys + offset)[None]


# ---------------------------------------------------------------------------------------------
# Fusion
# ---------------------------------------------------------------------------------------------
def test_fusion_known_answers():
    coarse = torch.tensor([[0.6, 0.4], [0.8, 0.2]])
    fine = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    product = fuse_probabilities(coarse, fine, "product")
    assert torch.allclose(product[0], torch.tensor([0.12, 0.32]) / 0.44)
    assert torch.allclose(product[1], coarse[1])  # an uninformative refiner leaves Ec's answer
    geometric = fuse_probabilities(coarse, fine, "geometric_mean")
    expected = torch.tensor([0.12, 0.32]).sqrt()
    assert torch.allclose(geometric[0], expected / expected.sum())
    assert torch.equal(fuse_probabilities(coarse, fine, "fine_only"), fine)


def test_fusion_survives_zero_probabilities():
    fused = fuse_probabilities(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), "product")
    assert torch.isfinite(fused).all()
    assert torch.allclose(fused.sum(dim=1), torch.ones(1))


def test_unknown_fusion_is_rejected():
    with pytest.raises(ValueError, match="MODEL.REFINER.FUSION"):
        heads(FixedProbs([0.5, 0.5]), fusion="sum")


# ---------------------------------------------------------------------------------------------
# Crops
# ---------------------------------------------------------------------------------------------
def test_square_context_box_keeps_center_and_longer_side():
    box = torch.tensor([[10.0, 20.0, 30.0, 60.0]])  # 20 wide, 40 tall
    assert torch.equal(square_context_boxes(box, 0.25), torch.tensor([[-10.0, 10.0, 50.0, 70.0]]))


def test_crops_hold_the_expected_pixels():
    image = ramp_image()
    batch = torch.stack([image, image + 1000])
    boxes = [
        torch.tensor([[8.0, 4.0, 24.0, 20.0], [8.0, 4.0, 16.0, 20.0]]),  # 16x16; 8 wide, 16 tall
        torch.tensor([[0.0, 32.0, 32.0, 64.0]]),  # 32x32, shrunk 2x
    ]
    crops = crop_and_resize(batch, boxes, output_size=16, context_margin=0.0)
    assert crops.shape == (3, 1, 16, 16)
    assert torch.allclose(crops[0], image[:, 4:20, 8:24])
    assert torch.allclose(crops[1], image[:, 4:20, 4:20])  # squared around its centre (12, 12)
    shrunk = nn.functional.avg_pool2d(image[None, :, 32:64, 0:32] + 1000, 2)[0]
    assert torch.allclose(crops[2], shrunk)  # from the second image, 2x2 averages


def test_crop_context_margin_widens_the_crop():
    image = ramp_image()
    crop = crop_and_resize(image[None], [torch.tensor([[24.0, 24.0, 40.0, 40.0]])], 32, context_margin=0.5)
    assert torch.allclose(crop[0], image[:, 16:48, 16:48])


def test_jitter_is_bounded_and_reproducible():
    boxes = torch.tensor([[10.0, 10.0, 30.0, 50.0]])
    a = jitter_boxes(boxes, 8, 0.1, torch.Generator().manual_seed(0))
    b = jitter_boxes(boxes, 8, 0.1, torch.Generator().manual_seed(0))
    assert a.shape == (8, 4) and torch.equal(a, b)
    centers = (a[:, :2] + a[:, 2:]) / 2
    sizes = a[:, 2:] - a[:, :2]
    assert ((centers - torch.tensor([20.0, 30.0])).abs() <= torch.tensor([2.0, 4.0]) + 1e-5).all()
    assert ((sizes / torch.tensor([20.0, 40.0]) - 1).abs() <= 0.1 + 1e-5).all()
    assert jitter_boxes(boxes, 0, 0.1).shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------
def test_inference_fuses_with_known_answer():
    roi = heads(FixedProbs([0.2, 0.8]), fusion="product").eval()
    images = ImageList(torch.zeros(1, 1, 64, 64), [(64, 64)])
    # Ec: P(nodule) = 0.9, p(benign | nodule) = 0.6 -> score 0.54; and a weak benign box.
    dets = detections([[4, 4, 20, 20], [30, 30, 50, 50]], [0.54, 0.1], [0, 0], [[0.6, 0.4], [0.9, 0.1]])
    with torch.no_grad():
        (out,), losses = roi(images, {}, [dets])
    assert losses == {}
    fused0 = torch.tensor([0.12, 0.32]) / 0.44
    assert out.pred_classes[0] == 1
    assert math.isclose(float(out.scores[0]), 0.9 * float(fused0[1]), rel_tol=1e-5)
    assert torch.allclose(out.class_probs[0], fused0)
    assert torch.allclose(out.coarse_probs[0], torch.tensor([0.6, 0.4]))
    assert torch.allclose(out.fine_probs, torch.tensor([[0.2, 0.8]] * 2))
    assert torch.equal(out.pred_boxes.tensor[0], torch.tensor([4.0, 4, 20, 20]))
    assert (out.scores[:-1] >= out.scores[1:]).all()
    for field in ("class_probs", "coarse_probs", "fine_probs"):
        assert out.get(field).shape == (2, 2)


def test_keep_input_classes_rescores_each_class():
    roi = heads(FixedProbs([0.2, 0.8]), keep_input_classes=True).eval()
    images = ImageList(torch.zeros(1, 1, 64, 64), [(64, 64)])
    dets = detections([[4, 4, 20, 20], [4, 4, 20, 20]], [0.54, 0.36], [0, 1], [[0.6, 0.4], [0.6, 0.4]])
    (out,), _ = roi(images, {}, [dets])
    assert sorted(out.pred_classes.tolist()) == [0, 1]


def test_inference_crops_each_image_of_the_batch():
    roi = heads(MeanIntensity(), fusion="fine_only").eval()
    images = ImageList(torch.stack([torch.zeros(1, 64, 64), torch.full((1, 64, 64), 2.0)]), [(64, 64)] * 2)
    dets = [
        detections([[4, 4, 20, 20]], [0.5], [0], [[0.5, 0.5]]),
        detections([[4, 4, 20, 20], [8, 8, 30, 30]], [0.5, 0.4], [0, 0], [[0.5, 0.5], [0.5, 0.5]]),
    ]
    out, _ = roi(images, {}, dets)
    assert [len(o) for o in out] == [1, 2]
    assert torch.allclose(out[0].fine_probs, torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(out[1].fine_probs, torch.softmax(torch.tensor([0.0, 2.0]), 0).expand(2, 2))


def test_inference_with_zero_detections():
    roi = heads(FixedProbs([0.5, 0.5])).eval()
    images = ImageList(torch.zeros(2, 1, 64, 64), [(64, 64)] * 2)
    empty = detections([], [], [], [])
    out, _ = roi(images, {}, [empty, detections([[1, 1, 9, 9]], [0.3], [1], [[0.4, 0.6]])])
    assert len(out[0]) == 0 and out[0].class_probs.shape == (0, 2) and out[0].scores.shape == (0,)
    assert len(out[1]) == 1
    (out,), _ = roi(ImageList(torch.zeros(1, 1, 64, 64), [(64, 64)]), {}, [empty])
    assert len(out) == 0 and out.fine_probs.shape == (0, 2)


def test_test_crops_average_is_deterministic():
    torch.manual_seed(0)
    roi = heads(MeanIntensity(), test_crops=4).eval()
    images = ImageList(torch.randn(1, 1, 64, 64), [(64, 64)])
    dets = detections([[4, 4, 40, 40]], [0.5], [0], [[0.5, 0.5]])
    (a,), _ = roi(images, {}, [dets])
    (b,), _ = roi(images, {}, [dets])
    assert torch.equal(a.fine_probs, b.fine_probs)
    single = heads(MeanIntensity(), test_crops=1).eval()
    (c,), _ = single(images, {}, [dets])
    assert not torch.allclose(a.fine_probs, c.fine_probs)


def test_test_flip_averages_each_crop_with_its_mirror_image():
    """The fine probabilities of a box are the mean of Ef on its crops and on their mirror
    images, for each box of a batch and beside jittered test crops."""

    class LeftHalf(nn.Module):  # logits (0, mean of the crop's left half): not mirror-invariant
        def forward(self, x):
            left = x[..., : x.shape[-1] // 2].mean(dim=(1, 2, 3))
            return torch.stack([torch.zeros_like(left), left], dim=1)

    g = torch.Generator().manual_seed(0)
    images = ImageList(torch.rand(1, 1, 64, 64, generator=g) * 4, [(64, 64)])
    dets = detections([[4, 4, 40, 40], [20, 10, 60, 50]], [0.5, 0.4], [0, 1], [[0.5, 0.5]] * 2)
    for test_crops in (1, 3):
        plain = heads(LeftHalf(), test_crops=test_crops).eval()
        flipped = heads(LeftHalf(), test_crops=test_crops, test_flip=True).eval()
        (out,), _ = flipped(images, {}, [dets])
        boxes = [dets.proposal_boxes.tensor]
        if test_crops > 1:
            gen = torch.Generator().manual_seed(0)
            boxes = [plain._with_test_jitter(boxes[0], gen)]
        crops = plain.crops(images.tensor, boxes)
        probs = [LeftHalf()(c).softmax(dim=1) for c in (crops, crops.flip(-1))]
        expected = torch.cat([p.view(2, test_crops, 2) for p in probs], dim=1).mean(dim=1)
        # outputs are sorted by score: match them to the input boxes by their boxes
        for box, fine in zip(out.pred_boxes.tensor, out.fine_probs):
            i = int((dets.proposal_boxes.tensor == box).all(dim=1).nonzero()[0])
            torch.testing.assert_close(fine, expected[i])
        (no_flip,), _ = plain(images, {}, [dets])
        assert not torch.allclose(no_flip.fine_probs, out.fine_probs)


def test_rpn_proposals_use_objectness_and_fine_probabilities():
    roi = heads(FixedProbs([0.3, 0.7]), fusion="product", proposals_per_image=2).eval()
    proposals = Instances((64, 64))
    proposals.proposal_boxes = Boxes(torch.tensor([[0, 0, 10, 10], [5, 5, 30, 30], [1, 1, 8, 8]], dtype=torch.float32))
    proposals.objectness_logits = torch.tensor([0.0, 2.0, -5.0])
    (out,), _ = roi(ImageList(torch.zeros(1, 1, 64, 64), [(64, 64)]), {}, [proposals])
    assert len(out) == 2  # the two most objectness-confident proposals
    assert torch.allclose(out.scores, torch.sigmoid(torch.tensor([2.0, 0.0])) * 0.7)
    assert torch.allclose(out.class_probs, out.fine_probs)
    assert torch.allclose(out.coarse_probs, torch.full((2, 2), 0.5))
    assert (out.pred_classes == 1).all()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def test_training_crops_and_labels():
    roi = heads(FixedProbs([0.5, 0.5]), gt_jitter_copies=3, batch_size_per_image=100, detection_iou=0.5).train()
    images = ImageList(torch.zeros(2, 1, 64, 64), [(64, 64)] * 2)
    gts = [targets([[10, 10, 30, 30], [40, 40, 60, 60]], [0, 1]), targets([], [])]
    dets = [
        detections([[41, 41, 60, 60], [0, 0, 5, 5]], [0.9, 0.8], [0, 0], [[0.5, 0.5]] * 2),
        detections([[10, 10, 30, 30]], [0.9], [1], [[0.5, 0.5]]),
    ]
    boxes, labels = roi.label_crops(images, dets, gts)
    # Image 0: 2 gt + 6 jittered + the detection matching the malignant gt; not the background one.
    assert len(boxes[0]) == 9 and labels[0].tolist()[:2] in ([0, 1], [1, 0])
    assert (labels[0] == 1).sum() == 5 and (labels[0] == 0).sum() == 4
    # Image 1 has no nodule: the refiner has no background class, so nothing to crop.
    assert len(boxes[1]) == 0
    capped = heads(FixedProbs([0.5, 0.5]), gt_jitter_copies=3, batch_size_per_image=4).train()
    boxes, labels = capped.label_crops(images, dets, gts)
    assert len(boxes[0]) == 4
    assert sorted(boxes[0][:2, 0].tolist()) == [10.0, 40.0]  # ground truths first


def test_training_crops_of_a_batch_sampled_at_once():
    """The batch's crops are drawn together but image by image in effect: a detection counts
    only against its own image's nodules, each image is capped on its own with its nodules
    first, and the random picks are uniform."""
    roi = heads(FixedProbs([0.5, 0.5]), gt_jitter_copies=2, batch_size_per_image=100).train()
    images = ImageList(torch.zeros(3, 1, 64, 64), [(64, 64), (40, 50), (64, 64)])
    gts = [
        targets([[10, 10, 30, 30]], [1]),
        targets([[30, 20, 50, 40], [0, 0, 12, 12]], [0, 1]),
        targets([], []),
    ]
    dets = [
        detections([[31, 21, 50, 40]], [0.9], [0], [[0.5, 0.5]]),  # image 1's nodule, not 0's
        detections([[30, 21, 50, 40], [1, 0, 12, 12]], [0.9, 0.8], [0, 0], [[0.5, 0.5]] * 2),
        detections([[10, 10, 30, 30]], [0.9], [1], [[0.5, 0.5]]),  # image 0's box, image 2
    ]
    rois, labels = roi.sample_crops(images, dets, gts)
    image = rois[:, 0].long()
    assert torch.bincount(image, minlength=3).tolist() == [1 + 2, 2 + 4 + 2, 0]
    assert labels[image == 0].tolist() == [1] * 3
    assert sorted(labels[image == 1].tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
    boxes = rois[image == 1, 1:]
    assert (boxes[:, 2] <= 50).all() and (boxes[:, 3] <= 40).all()  # clipped to its image
    nodules = [[30, 20, 50, 40], [0, 0, 12, 12]]
    assert boxes[:2].tolist() in (nodules, nodules[::-1])  # nodules first

    # Capped at 3: the nodule, then 2 of its 6 matched detections, uniformly.
    capped = heads(FixedProbs([0.5, 0.5]), gt_jitter_copies=0, batch_size_per_image=3).train()
    one_image = ImageList(torch.zeros(1, 1, 64, 64), [(64, 64)])
    nodule = [targets([[10, 10, 40, 40]], [1])]
    near = [[10 + i, 10, 40 + i, 40] for i in range(1, 7)]
    found = [detections(near, [0.9] * 6, [1] * 6, [[0.5, 0.5]] * 6)]
    counts = torch.zeros(6)
    torch.manual_seed(0)
    for _ in range(600):
        rois, labels = capped.sample_crops(one_image, found, nodule)
        assert rois[0, 1:].tolist() == [10, 10, 40, 40] and labels.tolist() == [1, 1, 1]
        counts[rois[1:, 1].long() - 11] += 1
    assert ((counts / 600 > 0.25) & (counts / 600 < 0.42)).all(), counts  # each 1/3
    # More nodules than the cap: nodules only.
    crowd = [targets([[i * 10, 0, i * 10 + 8, 8] for i in range(6)], [0] * 6)]
    rois, _ = capped.sample_crops(one_image, found, crowd)
    assert len(rois) == 3 and set(rois[:, 2].tolist()) == {0.0}


def test_training_loss_backward_and_empty_batch():
    roi = heads(MeanIntensity(), input_size=16).train()
    images = ImageList(torch.randn(1, 1, 64, 64), [(64, 64)])
    _, losses = roi(images, {}, [detections([], [], [], [])], [targets([[10, 10, 30, 30]], [1])])
    assert set(losses) == {"loss_refiner"} and losses["loss_refiner"] > 0
    losses["loss_refiner"].backward()
    assert roi.refiner.dummy.grad is not None
    _, losses = roi(images, {}, [detections([], [], [], [])], [targets([], [])])
    assert losses["loss_refiner"].item() == 0.0 and losses["loss_refiner"].requires_grad


def test_class_weights_set_the_balance_of_the_refiners_loss():
    """MODEL.REFINER.CLASS_WEIGHTS: each crop's cross-entropy weighted by its class, as a
    weighted mean; invalid weights are refused when the heads are built."""
    images = ImageList(torch.randn(1, 1, 64, 64), [(64, 64)])
    gts = [targets([[10, 10, 30, 30], [40, 40, 60, 60]], [0, 1])]
    probs = [0.2, 0.8]
    loss = {}
    for weights in ((), (3.0, 1.0), (6.0, 2.0)):
        torch.manual_seed(0)
        roi = heads(FixedProbs(probs), gt_jitter_copies=0, class_weights=weights).train()
        _, losses = roi(images, {}, [detections([], [], [], [])], gts)
        loss[weights] = losses["loss_refiner"].item()
    benign, malignant = -math.log(0.2), -math.log(0.8)
    assert loss[()] == pytest.approx((benign + malignant) / 2, rel=1e-5)
    assert loss[(3.0, 1.0)] == pytest.approx((3 * benign + malignant) / 4, rel=1e-5)
    assert loss[(6.0, 2.0)] == pytest.approx(loss[(3.0, 1.0)], rel=1e-6)  # only the ratio counts
    for bad, problem in (([2.0], "one weight per foreground class"), ([0.0, 1.0], "> 0")):
        with pytest.raises(ValueError, match=f"REFINER.CLASS_WEIGHTS.*{re.escape(problem)}"):
            heads(FixedProbs(probs), class_weights=bad)
    cfg = refiner_cfg()
    cfg.MODEL.REFINER.CLASS_WEIGHTS = [2.4, 1.0]
    assert build_roi_heads(cfg, None).class_weights == (2.4, 1.0)


def refiner_cfg():
    cfg = make_cfg()
    cfg.MODEL.ROI_HEADS.NAME = "RefinerROIHeads"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.MODEL.REFINER.WIDTH_MULT = 0.125
    cfg.MODEL.REFINER.FC_DIM = 16
    cfg.MODEL.REFINER.INPUT_SIZE = 64
    return cfg


def test_built_from_config_with_a_real_refiner():
    torch.manual_seed(0)
    roi = build_roi_heads(refiner_cfg(), None)
    images = ImageList(torch.randn(1, 1, 96, 96), [(96, 96)])
    dets = detections([[10, 10, 50, 40]], [0.7], [1], [[0.3, 0.7]], (96, 96))
    _, losses = roi.train()(images, {}, [dets], [targets([[12, 10, 50, 42]], [1], (96, 96))])
    losses["loss_refiner"].backward()
    assert roi.refiner.conv1.weight.grad.abs().sum() > 0
    (out,), _ = roi.eval()(images, {}, [dets])
    assert torch.allclose(out.class_probs.sum(dim=1), torch.ones(1))


def test_under_generalized_rcnn():
    """Proposals from detectron2's RPN: training adds GT boxes, inference rescores by objectness."""
    torch.manual_seed(0)
    cfg = refiner_cfg()
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 50
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.TEST.DETECTIONS_PER_IMAGE = 10
    model = build_model(cfg)
    inst = Instances((96, 128))
    inst.gt_boxes = Boxes(torch.tensor([[20.0, 20.0, 60.0, 50.0]]))
    inst.gt_classes = torch.tensor([1])
    batch = [{"image": torch.rand(1, 96, 128) * 255, "instances": inst, "height": 192, "width": 256}]
    model.train()
    with EventStorage():
        losses = model(batch)
    assert {"loss_refiner", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        (result,) = model(batch)
    out = result["instances"]
    assert out.image_size == (192, 256) and len(out) <= 10
    assert torch.allclose(out.class_probs, out.fine_probs)
    assert out.pred_classes.dtype == torch.int64 and out.scores.shape == (len(out),)


def test_former_name_still_builds_the_same_heads():
    """Configs and checkpoints that name SpatialPyramidROIHeads keep loading."""
    cfg = refiner_cfg()
    new = build_roi_heads(cfg, None)
    cfg.MODEL.ROI_HEADS.NAME = "SpatialPyramidROIHeads"
    old = build_roi_heads(cfg, None)
    assert isinstance(old, RefinerROIHeads)
    assert old.state_dict().keys() == new.state_dict().keys()
    old.load_state_dict(new.state_dict())


class CropSizes(nn.Module):
    """A refiner stub that records the side of every crop batch it is given."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.sides = []

    def forward(self, crops):
        self.sides.append(crops.shape[-1])
        return torch.zeros(len(crops), 2) + self.dummy


def test_test_input_size_sets_the_inference_crops_only():
    refiner = CropSizes()
    roi = heads(refiner, input_size=32, test_input_size=24)
    images = ImageList(torch.zeros(1, 1, 64, 64), [(64, 64)])
    target = Instances((64, 64), gt_boxes=Boxes(torch.tensor([[8.0, 8.0, 40.0, 40.0]])),
                       gt_classes=torch.tensor([1]))
    roi.train()
    roi(images, {}, [detections([[8, 8, 40, 40]], [0.9], [1], [[0.1, 0.9]])], [target])
    roi.eval()
    roi(images, {}, [detections([[8, 8, 40, 40]], [0.9], [1], [[0.1, 0.9]])])
    assert refiner.sides == [32, 24]
    # From the config: 0 means INPUT_SIZE.
    cfg = make_cfg("configs/mccnn.yaml", tiny=True)
    assert RefinerROIHeads.from_config(cfg, num_classes=2)["test_input_size"] is None
    cfg.MODEL.REFINER.TEST_INPUT_SIZE = 48
    assert RefinerROIHeads.from_config(cfg, num_classes=2)["test_input_size"] == 48
