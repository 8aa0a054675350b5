"""thyroid_det's parts under detectron2's meta-architectures, detectron2's backbones under Ec, the
peer configs, and the single-image Predictor on every one of them and on the full cascade.

Each config is built from its file with tiny widths (ResNet-18, 32-channel FPN, 1/16-width VGG)
at 128 px, trained for one step and run through :class:`thyroid_det.engine.Predictor`.
"""

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.modeling import GeneralizedRCNN, RetinaNet, build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from thyroid_det.engine import Predictor
from thyroid_det.modeling.anchor_generator import NodulePriorAnchorGenerator
from thyroid_det.modeling.meta_arch import MCCNN, MultiScaleSSD
from thyroid_det.modeling.roi_heads import RefinerROIHeads

from ..conftest import make_cfg

SIZE = 128
TINY_RESNET = [
    "MODEL.RESNETS.DEPTH", 18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.FPN.OUT_CHANNELS", 32,
]
TINY_REFINER = [
    "MODEL.REFINER.WIDTH_MULT", 0.125,
    "MODEL.REFINER.FC_DIM", 16,
    "MODEL.REFINER.INPUT_SIZE", 64,
    "MODEL.REFINER.BATCH_SIZE_PER_IMAGE", 4,
]
# config file -> (meta-architecture class, tiny overrides that keep every test output non-empty)
COMPOSITIONS = {
    "retinanet_vgg16_nodule_priors.yaml": (
        RetinaNet,
        ["MODEL.VGG.WIDTH_MULT", 1 / 16, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0],
    ),
    "rcnn_spatial_pyramid_R50_FPN.yaml": (GeneralizedRCNN, TINY_RESNET + TINY_REFINER),
    "mssd_R50_FPN.yaml": (MultiScaleSSD, TINY_RESNET + ["MODEL.SSD.SCORE_THRESH_TEST", 0.0]),
    "peer_retinanet_R50_FPN.yaml": (
        RetinaNet,
        TINY_RESNET + ["MODEL.RETINANET.SCORE_THRESH_TEST", 0.0],
    ),
    "peer_faster_rcnn_R50_FPN.yaml": (
        GeneralizedRCNN,
        TINY_RESNET + [
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64,
            "MODEL.ROI_BOX_HEAD.CONV_DIM", 32,
            "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
        ],
    ),
    "mccnn_synthetic.yaml": (
        MCCNN,
        ["MODEL.VGG.WIDTH_MULT", 1 / 16, "MODEL.SSD.SCORE_THRESH_TEST", 0.0] + TINY_REFINER,
    ),
}


def load_cfg(name, extra=()):
    cfg = make_cfg(name, list(COMPOSITIONS[name][1]) + list(extra))
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.FIXED_SIZE = (SIZE, SIZE)
    cfg.TEST.DETECTIONS_PER_IMAGE = 8
    return cfg


def training_batch():
    """Two 1xSxS images, each with one bright nodule, labelled benign and malignant."""
    g = torch.Generator().manual_seed(0)
    inputs = []
    for i in range(2):
        image = torch.rand(1, SIZE, SIZE, generator=g) * 60
        image[:, 30:80, 40:72] += 150
        inst = Instances((SIZE, SIZE))
        inst.gt_boxes = Boxes(torch.tensor([[40.0, 30.0, 72.0, 80.0]]))
        inst.gt_classes = torch.tensor([i])
        inputs.append({"image": image, "instances": inst, "height": SIZE, "width": SIZE})
    return inputs


def grayscale_image(height=90, width=150):
    """An HxW uint8 ultrasound-like image, not of the network's size or aspect ratio."""
    rng = np.random.RandomState(0)
    image = rng.randint(0, 60, size=(height, width)).astype(np.uint8)
    image[20:60, 50:90] += 150
    return image


def check_instances(inst, image_size, extra_fields=()):
    height, width = image_size
    assert inst.image_size == image_size
    n = len(inst)
    assert 0 < n <= 8
    boxes = inst.pred_boxes.tensor
    assert boxes.shape == (n, 4) and torch.isfinite(boxes).all()
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= width).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= height).all()
    assert inst.scores.shape == (n,) and ((inst.scores >= 0) & (inst.scores <= 1)).all()
    assert inst.pred_classes.dtype == torch.int64 and set(inst.pred_classes.tolist()) <= {0, 1}
    for field in extra_fields:
        probs = inst.get(field)
        assert probs.shape == (n, 2)
        assert torch.allclose(probs.sum(dim=1), torch.ones(n), atol=1e-5)


@pytest.fixture(scope="module", params=sorted(COMPOSITIONS))
def predictor(request):
    torch.manual_seed(0)
    return request.param, Predictor(load_cfg(request.param))


def test_config_builds_the_intended_model(predictor):
    name, pred = predictor
    assert type(pred.model) is COMPOSITIONS[name][0]
    # BGR in; MultiScaleSSD converts to one luma channel, detectron2's models keep three.
    channels = 1 if isinstance(pred.model, MultiScaleSSD) else 3
    assert pred.model.pixel_mean.shape == (channels, 1, 1)
    convs = [m for m in pred.model.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert min(c.in_channels for c in convs) == channels
    if name == "rcnn_spatial_pyramid_R50_FPN.yaml":
        assert isinstance(pred.model.roi_heads, RefinerROIHeads)
    if name in ("retinanet_vgg16_nodule_priors.yaml", "mssd_R50_FPN.yaml"):
        assert isinstance(pred.model.anchor_generator, NodulePriorAnchorGenerator)


def test_training_step_reaches_every_part(predictor):
    name, pred = predictor
    model = pred.model.train()
    try:
        with EventStorage():
            losses = model(training_batch())
        assert losses and all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
        with_grad = {
            n.split(".")[0]
            for n, p in model.named_parameters()
            if p.grad is not None and p.grad.abs().sum() > 0
        }
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    expected = {"backbone"}
    if isinstance(model, GeneralizedRCNN):
        expected |= {"proposal_generator", "roi_heads"}
        assert ("loss_refiner" in losses) == isinstance(model.roi_heads, RefinerROIHeads)
    else:  # SSD and RetinaNet; the cascade's first stage trains Ec alone
        expected |= {"head"}
    assert expected <= with_grad, f"{name}: no gradient reached {expected - with_grad}"


def test_predictor_outputs_are_in_the_original_frame(predictor):
    """Predictor == the model on the fixed-size input, rescaled to the image's own size."""
    name, pred = predictor
    image = grayscale_image()
    inst = pred(image)["instances"]
    refined = isinstance(getattr(pred.model, "roi_heads", None), RefinerROIHeads)
    if refined:
        extra = ("class_probs", "coarse_probs", "fine_probs")
    else:
        extra = ("class_probs",) if isinstance(pred.model, MultiScaleSSD) else ()
    check_instances(inst, image.shape, extra)
    if refined and isinstance(pred.model, GeneralizedRCNN):
        # RPN proposals carry no class distribution: nothing to fuse, the refiner's is final.
        assert torch.allclose(inst.coarse_probs, torch.full_like(inst.coarse_probs, 0.5))
        assert torch.allclose(inst.class_probs, inst.fine_probs)
        assert torch.equal(inst.pred_classes, inst.fine_probs.argmax(dim=1))

    bgr = np.repeat(image[:, :, None], 3, axis=2)
    resized = pred.aug.get_transform(bgr).apply_image(bgr)
    tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
    with torch.no_grad():
        direct = pred.model([{"image": tensor}])[0]["instances"]
    scale = torch.tensor([image.shape[1] / resized.shape[1], image.shape[0] / resized.shape[0]] * 2)
    assert direct.image_size == resized.shape[:2]
    assert torch.allclose(inst.pred_boxes.tensor, direct.pred_boxes.tensor * scale, atol=1e-3)
    assert torch.allclose(inst.scores, direct.scores)


def test_predictor_takes_grayscale_or_bgr_and_names_bad_shapes():
    torch.manual_seed(0)
    pred = Predictor(load_cfg("mssd_R50_FPN.yaml"))
    gray = grayscale_image()
    expected = pred(gray)["instances"]
    bgr = np.repeat(gray[:, :, None], 3, axis=2)
    for image in (gray[:, :, None], bgr):
        got = pred(image)["instances"]
        assert torch.equal(got.pred_boxes.tensor, expected.pred_boxes.tensor)
    with pytest.raises(ValueError, match=r"shape \(90, 150, 2\).*INPUT.FORMAT 'BGR'"):
        pred(np.zeros((90, 150, 2), np.uint8))


def test_mssd_on_resnet_fpn_p2_to_p6():
    """The other FPN level set: build_resnet_fpn_backbone's P2..P6 (LastLevelMaxPool)."""
    torch.manual_seed(0)
    cfg = load_cfg(
        "mssd_R50_FPN.yaml",
        [
            "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone",
            "MODEL.RESNETS.OUT_FEATURES", ["res2", "res3", "res4", "res5"],
            "MODEL.FPN.IN_FEATURES", ["res2", "res3", "res4", "res5"],
            "MODEL.SSD.IN_FEATURES", ["p2", "p3", "p4", "p5", "p6"],
        ],
    )
    model = build_model(cfg)
    strides = [model.backbone.output_shape()[f].stride for f in model.head_in_features]
    assert strides == [4, 8, 16, 32, 64]
    with EventStorage():
        sum(model(training_batch()).values()).backward()
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": training_batch()[0]["image"], "height": 90, "width": 150}])
    check_instances(out["instances"], (90, 150), ("class_probs",))


def test_retinanet_rejects_unequal_anchor_counts_per_level():
    cfg = load_cfg(
        "retinanet_vgg16_nodule_priors.yaml",
        ["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[1.0], [1.0, 2.0], [1.0], [1.0], [1.0]]],
    )
    with pytest.raises(AssertionError, match="different number of anchors between levels"):
        build_model(cfg)


def test_vgg_fpn_names_missing_levels():
    cfg = load_cfg(
        "retinanet_vgg16_nodule_priors.yaml",
        ["MODEL.VGG.OUT_FEATURES", ["conv4_3", "fc7", "extra1"]],
    )
    with pytest.raises(ValueError, match=r"MODEL.FPN.IN_FEATURES.*missing \['extra2', 'extra3'\]"):
        build_model(cfg)


def test_project_configs_resize_to_the_fixed_size_in_detectron2_paths():
    """BGR configs. detectron2's own resizes (INPUT.MIN/MAX_SIZE_TEST) pass the image unresized to
    the SSD models, which resize to FIXED_SIZE themselves, and give detectron2's models the long
    side of FIXED_SIZE."""
    for name in ["Base-SSD.yaml", "mssd_vgg16.yaml", "mccnn.yaml"] + sorted(
        n for n in COMPOSITIONS if "synthetic" not in n
    ):
        cfg = make_cfg(name)
        assert cfg.INPUT.FORMAT == "BGR" and len(cfg.MODEL.PIXEL_MEAN) == 3, name
        if cfg.MODEL.META_ARCHITECTURE in ("MultiScaleSSD", "MCCNN"):
            assert cfg.INPUT.MIN_SIZE_TEST == 0, name
        else:
            assert cfg.INPUT.MIN_SIZE_TEST == min(cfg.INPUT.FIXED_SIZE), name
            assert cfg.INPUT.MAX_SIZE_TEST == max(cfg.INPUT.FIXED_SIZE), name
