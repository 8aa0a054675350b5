"""torchvision's VGG-16 state dict as MODEL.WEIGHTS: converted on load into the VGG-16 backbone
(names, fc6/fc7 decimation, conv1_1 folded to the model's input), with a log line."""
import logging

import pytest
import torch
import torchvision
from detectron2.modeling import build_model
from torch.nn import functional as F

from thyroid_det.engine import CheckpointError, Checkpointer
from thyroid_det.modeling.backbone.vgg_imagenet import IMAGENET_MEAN, IMAGENET_STD
from thyroid_det.modeling.model_input import to_luma

from ..conftest import TINY_MODEL, make_cfg


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    """torchvision's vgg16 state dict layout with random values (built on the meta device and
    filled with randn: torchvision's own init of its 138M weights takes ~20 s on a CPU)."""
    with torch.device("meta"):
        layout = torchvision.models.vgg16(weights=None).state_dict()
    generator = torch.Generator().manual_seed(0)
    state_dict = {k: torch.randn(v.shape, generator=generator) for k, v in layout.items()}
    path = tmp_path_factory.mktemp("vgg") / "vgg16_imagenet.pth"
    torch.save(state_dict, path)
    return str(path), state_dict


def build(config, **overrides):
    opts = {**TINY_MODEL, "MODEL.VGG.WIDTH_MULT": "1.0", "MODEL.WEIGHTS": "", **overrides}
    cfg = make_cfg(config, opts)
    torch.manual_seed(1)
    return cfg, build_model(cfg).eval()


def test_cascade_backbone_is_initialised_from_vgg16(vgg16_file, caplog):
    path, source = vgg16_file
    cfg, model = build("configs/mccnn_imagenet.yaml")
    refiner_before = {k: v.clone() for k, v in model.roi_heads.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="thyroid_det.engine.checkpoint"):
        Checkpointer(model).load(path, checkpointables=[])
    backbone = model.backbone

    features = [i for i, m in enumerate(torchvision.models.vgg16().features) if hasattr(m, "weight")]
    for i, name in enumerate(["conv1.1", "conv2.0", "conv2.1", "conv3.0", "conv3.1", "conv3.2",
                              "conv4.0", "conv4.1", "conv4.2", "conv5.0", "conv5.1", "conv5.2"]):
        conv = backbone.get_submodule(name)
        assert torch.equal(conv.weight, source[f"features.{features[i + 1]}.weight"]), name
        assert torch.equal(conv.bias, source[f"features.{features[i + 1]}.bias"]), name
    fc6 = source["classifier.0.weight"].view(4096, 512, 7, 7)
    assert torch.equal(backbone.fc6.weight, fc6[::4, :, ::3, ::3])
    assert torch.equal(backbone.fc6.bias, source["classifier.0.bias"][::4])
    assert torch.equal(backbone.fc7.weight[:, :, 0, 0], source["classifier.3.weight"][::4, ::4])
    assert torch.equal(backbone.fc7.bias, source["classifier.3.bias"][::4])
    # what VGG-16 lacks keeps its initialisation
    for key, value in model.roi_heads.state_dict().items():
        assert torch.equal(value, refiner_before[key]), key

    # conv1_1 on the model's normalised luma of a gray image = ImageNet's conv1_1 on that image
    # as torchvision normalises it (RGB, [0, 1], ImageNet mean/std), away from the zero padding.
    gray = torch.rand(1, 1, 20, 24) * 255
    bgr = gray.expand(1, 3, 20, 24)
    ours = backbone.conv1[0](((to_luma(bgr, "BGR") - model.pixel_mean) / model.pixel_std))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    theirs = F.conv2d((bgr.flip(1) / 255 - mean) / std, source["features.0.weight"],
                      source["features.0.bias"], padding=1)
    theirs = F.relu(theirs)
    torch.testing.assert_close(ours[..., 1:-1, 1:-1], theirs[..., 1:-1, 1:-1], atol=1e-4, rtol=1e-4)

    (line,) = [r.getMessage() for r in caplog.records if "ImageNet VGG-16" in r.getMessage()]
    assert "1 luma channel" in line and "fc6/fc7 decimated" in line, line
    for kept in ("backbone.extra1", "backbone.conv4_3_norm", "head", "roi_heads"):
        assert kept in line, line


def test_three_channel_bgr_backbone_gets_filters_in_bgr_order(vgg16_file):
    path, source = vgg16_file
    cfg, model = build("configs/mssd_vgg16.yaml", **{"MODEL.LUMA_INPUT": "False", "MODEL.VGG.NORM": ""})
    Checkpointer(model).load(path, checkpointables=[])
    image = torch.rand(1, 3, 16, 16) * 255  # BGR
    ours = model.backbone.conv1[0]((image - model.pixel_mean) / model.pixel_std)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    theirs = F.relu(F.conv2d((image.flip(1) / 255 - mean) / std, source["features.0.weight"],
                             source["features.0.bias"], padding=1))
    torch.testing.assert_close(ours[..., 1:-1, 1:-1], theirs[..., 1:-1, 1:-1], atol=1e-4, rtol=1e-4)


def test_normalised_backbone_drops_the_biases(vgg16_file):
    path, source = vgg16_file
    cfg, model = build("configs/mssd_vgg16.yaml")  # MODEL.VGG.NORM "GN": convs without bias
    Checkpointer(model).load(path, checkpointables=[])
    assert torch.equal(model.backbone.conv3[0].weight, source["features.10.weight"])


def test_a_narrow_backbone_is_a_clear_error(vgg16_file):
    path, _ = vgg16_file
    cfg, model = build("configs/mssd_vgg16.yaml", **{"MODEL.VGG.WIDTH_MULT": "0.5"})
    with pytest.raises(CheckpointError, match="WIDTH_MULT 1.0.*32 filters"):
        Checkpointer(model).load(path, checkpointables=[])
