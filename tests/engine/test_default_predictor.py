"""thyroid_det's Predictor gives every shipped config what evaluation's mapper gives it, and
detectron2's own DefaultPredictor runs every config out of the box, predicting what Predictor
predicts on a BGR image of INPUT.FIXED_SIZE."""
import glob
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor

from thyroid_det.data.mapper import SSDDatasetMapper
from thyroid_det.engine import Predictor

from ..conftest import make_cfg

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "*.yaml")))
# Base-TN5000.yaml (the run) and Base-R50-FPN.yaml (a backbone) name no model to build.
NOT_MODELS = ("Base-TN5000.yaml", "Base-R50-FPN.yaml")
MODELS = [p for p in CONFIGS if os.path.basename(p) not in NOT_MODELS]
# Smaller ResNets/FPN for the R50 configs, and every score kept so outputs are not empty. FPN:
# 64 channels, so that GN's 32 groups have 2 values where the coarsest level is 1x1 (VGG's P7 at
# the tiny 128 px input).
TINY_EXTRA = [
    "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.FPN.OUT_CHANNELS", 64,
    "MODEL.SSD.SCORE_THRESH_TEST", 0.0, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
    # random weights: mccnn_imagenet.yaml names an ImageNet file that is fetched online
    "MODEL.WEIGHTS", "",
]


def load_cfg(path):
    return make_cfg(path, TINY_EXTRA, tiny=True)


def bgr_image(height=90, width=150):
    """A gray ultrasound-like image with a colour overlay (a red calliper mark), as exported."""
    rng = np.random.default_rng(0)
    gray = rng.integers(20, 90, (height, width)).astype(np.uint8)
    gray[30:60, 50:100] = 180
    image = np.repeat(gray[:, :, None], 3, axis=2)
    image[10:14, 10:40] = (0, 0, 255)
    return image


def assert_same_instances(expected, got, image_shape):
    assert len(expected) > 0 and got.image_size == expected.image_size == image_shape[:2]
    assert expected.get_fields().keys() == got.get_fields().keys()
    for name, value in expected.get_fields().items():
        value = value.tensor if hasattr(value, "tensor") else value
        other = got.get(name)
        other = other.tensor if hasattr(other, "tensor") else other
        assert torch.equal(value, other), name


@pytest.mark.parametrize("path", MODELS, ids=os.path.basename)
def test_predictor_sees_what_evaluation_sees(path, tmp_path):
    """predict.py's model input is evaluate.py's: the test mapper's resize to FIXED_SIZE, not
    DefaultPredictor's shorter-edge resize, which keeps the peers' aspect ratio."""
    cfg = load_cfg(path)
    torch.manual_seed(0)
    ours = Predictor(cfg)
    image = bgr_image()
    cv2.imwrite(str(tmp_path / "scan.png"), image)
    record = {"file_name": str(tmp_path / "scan.png"), "image_id": 0, "height": 90, "width": 150}
    with torch.no_grad():
        expected = ours.model([SSDDatasetMapper(cfg, is_train=False)(record)])[0]["instances"]
    assert_same_instances(expected, ours(image)["instances"], image.shape)


@pytest.mark.parametrize("path", MODELS, ids=os.path.basename)
def test_default_predictor_equals_the_project_predictor(path):
    """On an image of FIXED_SIZE, where both resizes keep it as it is. The configs that resize
    by the shorter edge set MIN/MAX_SIZE_TEST to FIXED_SIZE's side: the tiny size's here."""
    cfg = load_cfg(path)
    assert cfg.INPUT.FORMAT in ("BGR", "RGB")
    side = cfg.INPUT.FIXED_SIZE[0]
    cfg.INPUT.MAX_SIZE_TEST = side
    cfg.INPUT.MIN_SIZE_TEST = side if cfg.INPUT.MIN_SIZE_TEST else 0
    torch.manual_seed(0)
    theirs = DefaultPredictor(cfg)
    ours = Predictor(cfg)
    ours.model.load_state_dict(theirs.model.state_dict())
    image = bgr_image(*cfg.INPUT.FIXED_SIZE)
    assert_same_instances(theirs(image)["instances"], ours(image)["instances"], image.shape)


def test_shipped_shorter_edge_resizes_keep_fixed_size():
    """What makes the equality above hold at full size: every config that resizes by the
    shorter edge has MIN_SIZE_TEST = MAX_SIZE_TEST = FIXED_SIZE's side (square)."""
    for path in MODELS:
        cfg = make_cfg(path)
        height, width = cfg.INPUT.FIXED_SIZE
        if cfg.INPUT.MIN_SIZE_TEST:
            assert height == width == cfg.INPUT.MIN_SIZE_TEST == cfg.INPUT.MAX_SIZE_TEST, path


def test_ssd_models_take_one_luma_channel_and_resize_themselves():
    """BGR or gray of any size in, the backbone sees one luma channel at INPUT.FIXED_SIZE (which
    lets DefaultPredictor pass images unresized); gray inputs (R = G = B) predict as their
    single-channel version."""
    cfg = load_cfg(os.path.join(os.path.dirname(CONFIGS[0]), "mccnn_synthetic.yaml"))
    torch.manual_seed(0)
    pred = Predictor(cfg)
    seen = []
    pred.model.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    image = bgr_image()
    gray = image[:, :, 1].copy()
    out_bgr = pred(np.repeat(gray[:, :, None], 3, axis=2))["instances"]
    out_gray = pred(gray)["instances"]
    assert torch.allclose(out_bgr.scores, out_gray.scores)
    for unresized in (gray[None], image.transpose(2, 0, 1)):
        with torch.no_grad():
            direct = pred.model([{"image": torch.as_tensor(unresized.astype("float32"))}])[0]
        assert seen[-1] == (1, 1, *cfg.INPUT.FIXED_SIZE)
        assert direct["instances"].image_size == gray.shape
