"""SSDDatasetMapper on tiny PNGs the tests write: output contract, box/content alignment, seeds."""
import os

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.structures import BoxMode
from PIL import Image

from thyroid_det.data.mapper import SSDDatasetMapper

from ..conftest import make_cfg

OUT_H, OUT_W = 48, 64
# Per-class brightness, so each output box can be checked against the class it kept.
BACKGROUND, CLASS_VALUE = 20, {0: 150, 1: 240}
BOXES = [((8, 6, 34, 30), 0), ((44, 22, 74, 50), 1)]  # XYXY in a 80x56 image


def write_image(path, mode="L", height=56, width=80):
    img = np.full((height, width), BACKGROUND, np.uint8)
    for (x0, y0, x1, y1), cls in BOXES:
        img[y0:y1, x0:x1] = CLASS_VALUE[cls]
    if mode == "RGB":
        # Channels scaled differently so the channel order is visible in the output.
        img = np.stack([img, img // 2, img // 4], axis=-1)
    Image.fromarray(img, mode).save(path)
    return str(path)


def record(file_name, annotations=None, **extra):
    if annotations is None:
        annotations = [
            {"bbox": list(box), "bbox_mode": BoxMode.XYXY_ABS, "category_id": cls}
            for box, cls in BOXES
        ]
    return {
        "file_name": file_name,
        "image_id": 7,
        "height": 56,
        "width": 80,
        "annotations": annotations,
        **extra,
    }


def mapper_cfg(image_format="L", **ssd_aug):
    cfg = make_cfg()
    cfg.INPUT.FIXED_SIZE = (OUT_H, OUT_W)
    cfg.INPUT.FORMAT = image_format
    if image_format == "L":  # one gray channel, as older configs (the default is BGR)
        cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [58.6], [50.2]
    else:
        cfg.MODEL.PIXEL_MEAN = [103.5, 116.3, 123.7]
        cfg.MODEL.PIXEL_STD = [57.4, 57.1, 58.4]
    for key, value in ssd_aug.items():
        cfg.INPUT.SSD_AUG[key] = value
    return cfg


@pytest.fixture
def gray_png(tmp_path):
    return write_image(tmp_path / "gray.png")


def test_test_mode_resizes_image_and_boxes(gray_png):
    src = record(gray_png)
    src["annotations"].append(dict(src["annotations"][0], iscrowd=1))
    out = SSDDatasetMapper(mapper_cfg(), is_train=False)(src)
    assert len(src["annotations"]) == 3 and "annotations" not in out
    assert out["image"].shape == (1, OUT_H, OUT_W) and out["image"].dtype == torch.uint8
    assert (out["height"], out["width"], out["file_name"], out["image_id"]) == (56, 80, gray_png, 7)
    inst = out["instances"]
    assert inst.image_size == (OUT_H, OUT_W)
    scale = torch.tensor([OUT_W / 80, OUT_H / 56] * 2)
    expected = torch.tensor([box for box, _ in BOXES], dtype=torch.float32) * scale
    torch.testing.assert_close(inst.gt_boxes.tensor, expected)
    assert inst.gt_classes.tolist() == [0, 1]


def test_test_mode_without_annotations_has_no_instances(gray_png):
    src = record(gray_png)
    del src["annotations"], src["height"], src["width"]
    out = SSDDatasetMapper(mapper_cfg(), is_train=False)(src)
    assert "instances" not in out and (out["height"], out["width"]) == (56, 80)


def assert_boxes_match_content(image, instances):
    """Every box lies in the image and its interior has its class's brightness."""
    img = image[0].numpy().astype(np.float64)
    boxes = instances.gt_boxes.tensor.numpy()
    assert (boxes >= 0).all()
    assert (boxes[:, [0, 2]] <= OUT_W).all() and (boxes[:, [1, 3]] <= OUT_H).all()
    for (x0, y0, x1, y1), cls in zip(boxes, instances.gt_classes.tolist()):
        # Two pixels in from each side, past the resize filter's reach.
        inner = img[int(np.ceil(y0)) + 2 : int(y1) - 2, int(np.ceil(x0)) + 2 : int(x1) - 2]
        if inner.size:
            np.testing.assert_allclose(inner, CLASS_VALUE[cls], atol=3)


@pytest.mark.parametrize("ssd_aug", [True, False])
def test_train_mode_keeps_boxes_on_their_nodules(gray_png, ssd_aug):
    cfg = mapper_cfg(ENABLED=ssd_aug, PHOTOMETRIC=False, EXPAND_PROB=0.7, CROP_SKIP_PROB=0.0)
    mapper = SSDDatasetMapper(cfg, is_train=True)
    counts = set()
    for seed in range(25):
        np.random.seed(seed)
        out = mapper(record(gray_png))
        assert out["image"].shape == (1, OUT_H, OUT_W)
        assert out["instances"].image_size == (OUT_H, OUT_W)
        assert len(out["instances"]) >= 1
        assert_boxes_match_content(out["image"], out["instances"])
        counts.add(len(out["instances"]))
    # Crops drop the nodule whose centre they leave out; without SSD augmentation none is dropped.
    assert counts == ({1, 2} if ssd_aug else {2})


def test_train_mode_photometric_changes_only_intensity(gray_png):
    mapper = SSDDatasetMapper(mapper_cfg(EXPAND_PROB=0.0, CROP_SKIP_PROB=1.0), is_train=True)
    scale = np.array([OUT_W / 80, OUT_H / 56] * 2)
    resized = np.array([box for box, _ in BOXES], np.float32) * scale
    mirrored = resized.copy()
    mirrored[:, [0, 2]] = OUT_W - resized[:, [2, 0]]
    nodule_values = set()
    for seed in range(8):
        np.random.seed(seed)
        out = mapper(record(gray_png))
        boxes = out["instances"].gt_boxes.tensor.numpy()
        assert np.allclose(boxes, resized, atol=1e-4) or np.allclose(boxes, mirrored, atol=1e-4)
        x0, y0, x1, y1 = boxes[1].astype(int)
        nodule_values.add(int(out["image"][0, (y0 + y1) // 2, (x0 + x1) // 2]))
    assert len(nodule_values) > 2


def test_crop_keeps_boxes_by_centre_and_clips_them(gray_png):
    def crop_to(width):
        crop = T.CropTransform(0, 0, width, 56)
        mapper = SSDDatasetMapper(is_train=True, augmentations=[crop], image_format="L")
        return mapper(record(gray_png))["instances"]

    # The class-1 nodule spans x 44..74 (centre 59): partly visible in a 50-wide crop, yet dropped.
    for width in (40, 50):
        inst = crop_to(width)
        assert inst.gt_classes.tolist() == [0]
        assert inst.gt_boxes.tensor.tolist() == [[8, 6, 34, 30]]
    inst = crop_to(60)
    assert inst.gt_classes.tolist() == [0, 1]
    assert inst.gt_boxes.tensor.tolist() == [[8, 6, 34, 30], [44, 22, 60, 50]]


def test_images_without_boxes_pass_through(gray_png):
    mapper = SSDDatasetMapper(mapper_cfg(EXPAND_PROB=1.0, CROP_SKIP_PROB=0.0), is_train=True)
    for seed in range(5):
        np.random.seed(seed)
        out = mapper(record(gray_png, annotations=[]))
        assert out["image"].shape == (1, OUT_H, OUT_W) and len(out["instances"]) == 0
    src = record(gray_png)
    del src["annotations"]
    assert len(mapper(src)["instances"]) == 0
    test_out = SSDDatasetMapper(mapper_cfg(), is_train=False)(record(gray_png, annotations=[]))
    assert len(test_out["instances"]) == 0


@pytest.mark.parametrize("image_format", ["BGR", "RGB"])
def test_colour_formats(tmp_path, image_format):
    png = write_image(tmp_path / "colour.png", mode="RGB")
    test_out = SSDDatasetMapper(mapper_cfg(image_format), is_train=False)(record(png))
    assert test_out["image"].shape == (3, OUT_H, OUT_W)
    # A pixel inside the class-1 nodule, written as RGB (240, 120, 60).
    centre = test_out["image"][:, OUT_H * 36 // 56, OUT_W * 59 // 80].tolist()
    assert centre == ([60, 120, 240] if image_format == "BGR" else [240, 120, 60])
    mapper = SSDDatasetMapper(mapper_cfg(image_format, EXPAND_PROB=1.0), is_train=True)
    for seed in range(5):
        np.random.seed(seed)
        out = mapper(record(png))
        assert out["image"].shape == (3, OUT_H, OUT_W) and len(out["instances"]) >= 1


def test_grayscale_config_reads_colour_files_as_one_channel(tmp_path):
    png = write_image(tmp_path / "colour.png", mode="RGB")
    out = SSDDatasetMapper(mapper_cfg(), is_train=True)(record(png))
    assert out["image"].shape == (1, OUT_H, OUT_W)


def test_seeded_runs_repeat(gray_png):
    mapper = SSDDatasetMapper(mapper_cfg(EXPAND_PROB=0.8), is_train=True)

    def run(seed):
        np.random.seed(seed)
        return [mapper(record(gray_png)) for _ in range(4)]

    first, again, other = run(11), run(11), run(12)
    for a, b in zip(first, again):
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["instances"].gt_boxes.tensor, b["instances"].gt_boxes.tensor)
        assert torch.equal(a["instances"].gt_classes, b["instances"].gt_classes)
    assert any(not torch.equal(a["image"], c["image"]) for a, c in zip(first, other))


def test_explicit_arguments(gray_png):
    mapper = SSDDatasetMapper(is_train=False, augmentations=[T.Resize((16, 24))], image_format="L")
    assert mapper(record(gray_png))["image"].shape == (1, 16, 24)


def test_xywh_annotations_are_converted(gray_png):
    annos = [{"bbox": [8, 6, 26, 24], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}]
    out = SSDDatasetMapper(mapper_cfg(), is_train=False)(record(gray_png, annotations=annos))
    expected = torch.tensor([[8 * 0.8, 6 * 48 / 56, 34 * 0.8, 30 * 48 / 56]])
    torch.testing.assert_close(out["instances"].gt_boxes.tensor, expected)


def test_bad_files_raise_errors_naming_the_file(tmp_path, gray_png):
    mapper = SSDDatasetMapper(mapper_cfg(), is_train=False)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    for path in (str(broken), str(tmp_path / "missing.png")):
        with pytest.raises(OSError, match="Cannot read image.*" + os.path.basename(path)):
            mapper(record(path))
    with pytest.raises(SizeMismatchError, match="gray.png"):
        mapper(record(gray_png, height=57))


@pytest.mark.tn5000
def test_real_tn5000_images(tn5000_datasets):
    import xml.etree.ElementTree as ET

    TN5000 = os.path.join(tn5000_datasets, "TN5000")
    names = sorted(os.listdir(os.path.join(TN5000, "Annotations")))[:3]
    cfg = mapper_cfg()
    cfg.INPUT.FIXED_SIZE = (128, 128)
    train, test = SSDDatasetMapper(cfg, is_train=True), SSDDatasetMapper(cfg, is_train=False)
    np.random.seed(0)
    for name in names:
        root = ET.parse(os.path.join(TN5000, "Annotations", name)).getroot()
        annos = [
            {
                "bbox": [
                    float(obj.find("bndbox/" + k).text) for k in ("xmin", "ymin", "xmax", "ymax")
                ],
                "bbox_mode": BoxMode.XYXY_ABS,
                "category_id": int(obj.find("name").text),
            }
            for obj in root.findall("object")
        ]
        src = {
            "file_name": os.path.join(TN5000, "JPEGImages", root.find("filename").text),
            "image_id": name,
            "annotations": annos,
        }
        for mapper in (train, test):
            out = mapper(src)
            assert out["image"].shape == (1, 128, 128)
            assert (out["height"], out["width"]) == (
                int(root.find("size/height").text), int(root.find("size/width").text)
            )
            assert 1 <= len(out["instances"]) <= len(annos)
