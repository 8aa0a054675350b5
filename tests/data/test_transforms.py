"""SSD augmentations: each one on a hand-built image whose box contents are known."""
import numpy as np
import pytest
from detectron2.data import transforms as T
from fvcore.transforms.transform import CropTransform, NoOpTransform

from thyroid_det.data.transforms import (
    FillPadTransform,
    MinIoURandomCrop,
    RandomExpand,
    build_ssd_augmentation,
)

from ..conftest import make_cfg

BACKGROUND, NODULE = 20, 230


def nodule_image(height=60, width=80, boxes=((10, 8, 30, 28), (50, 30, 75, 55)), channels=1):
    """A dark image with bright rectangles at integer XYXY ``boxes``."""
    img = np.full((height, width, channels), BACKGROUND, np.uint8)
    for x0, y0, x1, y1 in boxes:
        img[y0:y1, x0:x1] = NODULE
    return img, np.array(boxes, dtype=np.float64).reshape(-1, 4)


def iou_with(rect, boxes):
    x0, y0, x1, y1 = rect
    iw = np.clip(np.minimum(x1, boxes[:, 2]) - np.maximum(x0, boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(y1, boxes[:, 3]) - np.maximum(y0, boxes[:, 1]), 0, None)
    inter = iw * ih
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / ((x1 - x0) * (y1 - y0) + areas - inter)


def centres_inside(rect, boxes):
    x0, y0, x1, y1 = rect
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    return (x0 < cx) & (cx < x1) & (y0 < cy) & (cy < y1)


def test_fill_pad_per_channel_and_inverse():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    tfm = FillPadTransform(1, 2, 3, 0, orig_w=3, orig_h=2, pad_value=(10.4, 20.6, 30.0))
    out = tfm.apply_image(img)
    assert out.shape == (4, 7, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], [10, 21, 30])
    np.testing.assert_array_equal(out[2:4, 1:4], img)
    np.testing.assert_array_equal(tfm.inverse().apply_image(out), img)
    gray = FillPadTransform(0, 0, 2, 1, pad_value=58.6).apply_image(img[..., :1])
    assert gray.shape == (3, 5, 1) and gray[-1, -1, 0] == 59


def test_expand_keeps_boxes_on_pasted_content():
    img, boxes = nodule_image()
    aug = RandomExpand(ratio_range=(1.5, 3.0), prob=1.0, fill=58.6)
    for seed in range(10):
        np.random.seed(seed)
        aug_input = T.AugInput(img, boxes=boxes)
        tfm = aug(aug_input)
        out, out_boxes = aug_input.image, aug_input.boxes
        assert out.shape[0] >= 1.5 * img.shape[0] - 1 and out.shape[1] >= 1.5 * img.shape[1] - 1
        # The pasted image is where the transform says, and the canvas is the fill value.
        x0, y0 = tfm.x0, tfm.y0
        np.testing.assert_array_equal(out[y0 : y0 + img.shape[0], x0 : x0 + img.shape[1]], img)
        assert (out == 59).sum() == out.size - img.size
        for bx0, by0, bx1, by1 in out_boxes.astype(int):
            assert (out[by0:by1, bx0:bx1] == NODULE).all()
        np.testing.assert_allclose(out_boxes - boxes, [[x0, y0, x0, y0]] * len(boxes))


def test_expand_probability_zero_is_identity():
    img, _ = nodule_image()
    aug = RandomExpand(prob=0.0)
    assert all(isinstance(aug.get_transform(img), NoOpTransform) for _ in range(5))
    with pytest.raises(ValueError, match="ratio_range"):
        RandomExpand(ratio_range=(0.5, 2.0))


# High thresholds often fail all 50 tries (the whole image is then used), as in SSD.
@pytest.mark.parametrize("min_iou, min_crops", [(0.1, 25), (0.5, 10), (0.7, 5)])
def test_min_iou_crop_meets_threshold_with_a_kept_box(min_iou, min_crops):
    img, boxes = nodule_image(height=100, width=120, boxes=((10, 10, 60, 70), (70, 40, 110, 90)))
    aug = MinIoURandomCrop(min_ious=(min_iou,), skip_prob=0.0)
    crops = 0
    for seed in range(30):
        np.random.seed(seed)
        tfm = aug.get_transform(img, boxes)
        if isinstance(tfm, NoOpTransform):
            continue
        assert isinstance(tfm, CropTransform)
        crops += 1
        rect = (tfm.x0, tfm.y0, tfm.x0 + tfm.w, tfm.y0 + tfm.h)
        assert 0 <= rect[0] < rect[2] <= 120 and 0 <= rect[1] < rect[3] <= 100
        assert tfm.w >= int(0.3 * 120) and tfm.h >= int(0.3 * 100)
        assert 0.5 <= tfm.w / tfm.h <= 2.0
        kept = centres_inside(rect, boxes)
        assert kept.any()
        assert iou_with(rect, boxes[kept]).max() >= min_iou
    assert crops >= min_crops


def test_min_iou_crop_skip_and_impossible_threshold_give_whole_image():
    img, boxes = nodule_image(height=100, width=120, boxes=((10, 10, 14, 14),))
    always_skip = MinIoURandomCrop(skip_prob=1.0)
    # A 4x4 box cannot reach IoU 0.95 with a crop of at least 36x30 pixels.
    impossible = MinIoURandomCrop(min_ious=(0.95,), skip_prob=0.0)
    for seed in range(5):
        np.random.seed(seed)
        assert isinstance(always_skip.get_transform(img, boxes), NoOpTransform)
        assert isinstance(impossible.get_transform(img, boxes), NoOpTransform)


def test_min_iou_crop_without_boxes_crops_freely():
    img = np.zeros((100, 120, 1), np.uint8)
    aug = MinIoURandomCrop(min_ious=(0.9,), skip_prob=0.0)
    for seed in range(10):
        np.random.seed(seed)
        for empty in (np.zeros((0, 4)), None):
            tfm = aug.get_transform(img, empty)
            assert isinstance(tfm, CropTransform)
            assert tfm.x0 + tfm.w <= 120 and tfm.y0 + tfm.h <= 100
    # Through AugInput, as the mapper calls it.
    aug_input = T.AugInput(img, boxes=np.zeros((0, 4)))
    T.AugmentationList([aug, T.Resize((32, 32))])(aug_input)
    assert aug_input.image.shape == (32, 32, 1) and aug_input.boxes.shape == (0, 4)


def test_horizontal_flip_moves_boxes_with_content():
    img, boxes = nodule_image()
    aug_input = T.AugInput(img, boxes=boxes)
    T.AugmentationList([T.Resize((30, 40)), T.RandomFlip(prob=1.0)])(aug_input)
    out, out_boxes = aug_input.image, aug_input.boxes
    np.testing.assert_allclose(out_boxes[0], [40 - 15, 4, 40 - 5, 14])
    for bx0, by0, bx1, by1 in out_boxes.astype(int):
        assert (out[by0 + 1 : by1 - 1, bx0 + 1 : bx1 - 1] >= NODULE - 1).all()


def augmentation_cfg(**ssd_aug):
    cfg = make_cfg()
    cfg.INPUT.FIXED_SIZE = (48, 64)
    cfg.INPUT.FORMAT, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = "L", [58.6], [50.2]
    for key, value in ssd_aug.items():
        cfg.INPUT.SSD_AUG[key] = value
    return cfg


def test_build_ssd_augmentation_pipelines():
    kinds = lambda augs: [type(a).__name__ for a in augs]  # noqa: E731
    cfg = augmentation_cfg()
    assert kinds(build_ssd_augmentation(cfg, True)) == [
        "RandomApply", "RandomApply", "RandomExpand", "MinIoURandomCrop", "Resize", "RandomFlip"
    ]
    assert kinds(build_ssd_augmentation(cfg, False)) == ["Resize"]
    assert kinds(build_ssd_augmentation(augmentation_cfg(PHOTOMETRIC=False), True))[0] == "RandomExpand"
    assert kinds(build_ssd_augmentation(augmentation_cfg(ENABLED=False), True)) == ["Resize", "RandomFlip"]
    cfg.INPUT.RANDOM_FLIP = "none"
    assert kinds(build_ssd_augmentation(cfg, True))[-1] == "Resize"


def test_full_pipeline_outputs_fixed_size_and_is_seeded():
    img, boxes = nodule_image()
    augs = T.AugmentationList(build_ssd_augmentation(augmentation_cfg(EXPAND_PROB=1.0), True))
    results = []
    for seed in (3, 3, 4):
        np.random.seed(seed)
        aug_input = T.AugInput(img, boxes=boxes)
        augs(aug_input)
        assert aug_input.image.shape == (48, 64, 1) and aug_input.image.dtype == np.uint8
        results.append((aug_input.image, aug_input.boxes))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert not np.array_equal(results[0][0], results[2][0])
