"""detectron2's own DefaultPredictor runs every shipped config out of the box and predicts what
thyroid_det's Predictor predicts on the same BGR image."""
import glob
import os

import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor

from thyroid_det.engine import Predictor

from ..conftest import make_cfg

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "*.yaml")))
# Base-TN5000.yaml (the run) and Base-R50-FPN.yaml (a backbone) name no model to build.
NOT_MODELS = ("Base-TN5000.yaml", "Base-R50-FPN.yaml")
MODELS = [p for p in CONFIGS if os.path.basename(p) not in NOT_MODELS]
# Smaller ResNets/FPN for the R50 configs, and every score kept so outputs are not empty.
TINY_EXTRA = [
    "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.FPN.OUT_CHANNELS", 32,
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


@pytest.mark.parametrize("path", MODELS, ids=os.path.basename)
def test_default_predictor_equals_the_project_predictor(path):
    cfg = load_cfg(path)
    assert cfg.INPUT.FORMAT in ("BGR", "RGB")
    torch.manual_seed(0)
    theirs = DefaultPredictor(cfg)
    ours = Predictor(cfg)
    ours.model.load_state_dict(theirs.model.state_dict())
    image = bgr_image()
    expected = theirs(image)["instances"]
    got = ours(image)["instances"]
    assert len(expected) > 0 and got.image_size == expected.image_size == image.shape[:2]
    assert expected.get_fields().keys() == got.get_fields().keys()
    for name, value in expected.get_fields().items():
        value = value.tensor if hasattr(value, "tensor") else value
        other = got.get(name)
        other = other.tensor if hasattr(other, "tensor") else other
        assert torch.equal(value, other), name


def test_ssd_models_take_one_luma_channel_and_resize_themselves():
    """BGR in, the backbone sees one luma channel at INPUT.FIXED_SIZE; gray inputs (R = G = B)
    predict as their single-channel version."""
    cfg = load_cfg(os.path.join(os.path.dirname(CONFIGS[0]), "mccnn_synthetic.yaml"))
    torch.manual_seed(0)
    pred = Predictor(cfg)
    seen = []
    pred.model.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    image = bgr_image()
    gray = image[:, :, 1].copy()
    out_bgr = pred(np.repeat(gray[:, :, None], 3, axis=2))["instances"]
    out_gray = pred(gray)["instances"]
    assert seen[0] == (1, 1, *cfg.INPUT.FIXED_SIZE)
    assert torch.allclose(out_bgr.scores, out_gray.scores)
    direct = pred.model([{"image": torch.as_tensor(gray[None].astype("float32"))}])[0]
    assert torch.allclose(direct["instances"].pred_boxes.tensor, out_gray.pred_boxes.tensor)
