"""DICOM frames and calibration, on files the tests write with pydicom."""

import json

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import RLELossless

from thyroid_det.data.datasets import load_coco
from thyroid_det.data.dicom import DicomError, box_size_mm, is_dicom, read_dicom, read_dicom_header
from thyroid_det.data.image_io import image_size, read_grayscale, read_image
from thyroid_det.data.mapper import SSDDatasetMapper


def gradient(height=48, width=64):
    return np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))


def test_uncalibrated_monochrome(tmp_path, make_dicom):
    image = gradient()
    path = make_dicom(tmp_path / "plain.dcm", image)
    dicom = read_dicom(path)
    assert len(dicom.frames) == 1 and dicom.frames[0].dtype == np.uint8
    np.testing.assert_array_equal(dicom.frames[0], image)
    assert dicom.calibration is None
    size = box_size_mm(dicom.calibration, [0, 0, 10, 10])
    assert size["calibration"] == "none" and "no physical calibration" in size["reason"]


def test_ultrasound_regions_give_millimetres(tmp_path, make_dicom):
    path = make_dicom(tmp_path / "us.dcm", gradient(), calibration=("us", 0.1, 0.2))
    dicom = read_dicom(path)
    assert dicom.calibration.source == "SequenceOfUltrasoundRegions"
    size = box_size_mm(dicom.calibration, [10, 10, 30, 20])
    assert size["width_mm"] == pytest.approx(2.0) and size["height_mm"] == pytest.approx(2.0)
    assert size["diameter_mm"] == pytest.approx(2.0)
    # The JSON form that dataset records carry measures the same.
    assert box_size_mm(dicom.calibration.to_dict(), [10, 10, 30, 20]) == size


def test_box_measured_in_the_region_that_contains_it(tmp_path, make_dicom):
    regions = [(0, 0, 31, 47, 0.1, 0.1), (32, 0, 63, 47, 0.5, 0.5)]
    path = make_dicom(tmp_path / "two.dcm", gradient(), calibration=("us_regions", regions))
    _, calibration = read_dicom_header(path)
    assert box_size_mm(calibration, [2, 2, 12, 12])["width_mm"] == pytest.approx(1.0)
    assert box_size_mm(calibration, [40, 2, 50, 12])["width_mm"] == pytest.approx(5.0)
    straddles = box_size_mm(calibration, [20, 2, 50, 12])
    assert straddles["calibration"] == "none" and "outside" in straddles["reason"]


def test_pixel_spacing(tmp_path, make_dicom):
    path = make_dicom(tmp_path / "sc.dcm", gradient(), calibration=("spacing", 0.3, 0.1), modality="OT")
    info, calibration = read_dicom_header(path)
    assert info["sop_class"] == "1.2.840.10008.5.1.4.1.1.7"
    size = box_size_mm(calibration, [0, 0, 10, 10])
    assert calibration.source == "PixelSpacing"
    assert (size["width_mm"], size["height_mm"]) == (pytest.approx(1.0), pytest.approx(3.0))


def test_multi_frame_rle_compressed(tmp_path, make_dicom):
    frames = np.stack([gradient(), 255 - gradient(), np.full((48, 64), 7, np.uint8)])
    path = make_dicom(tmp_path / "cine.dcm", frames, ("us", 0.1, 0.1), transfer_syntax=RLELossless)
    dicom = read_dicom(path)
    assert dicom.info["num_frames"] == 3 and dicom.info["transfer_syntax"] == RLELossless
    for got, want in zip(dicom.frames, frames):
        np.testing.assert_array_equal(got, want)


def test_rgb_becomes_luma(tmp_path, make_dicom):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3)).astype(np.uint8)
    dicom = read_dicom(make_dicom(tmp_path / "rgb.dcm", rgb))
    np.testing.assert_array_equal(dicom.frames[0], np.asarray(Image.fromarray(rgb).convert("L")))


def test_16bit_uses_the_stored_range(tmp_path, make_dicom):
    image = (gradient().astype(np.uint16) * 257)
    dicom = read_dicom(make_dicom(tmp_path / "deep.dcm", image))
    np.testing.assert_array_equal(dicom.frames[0], gradient())


def test_not_dicom_is_a_clear_error(tmp_path):
    path = tmp_path / "fake.dcm"
    path.write_bytes(b"hello")
    assert is_dicom(str(path))
    with pytest.raises(DicomError, match="not a DICOM file|unreadable DICOM"):
        read_dicom(str(path))
    with pytest.raises(DicomError, match="no such file"):
        read_dicom(str(tmp_path / "missing.dcm"))


def test_jpeg2000_lossless(tmp_path, make_dicom):
    """JPEG 2000 decodes through pylibjpeg-openjpeg, which setup.py installs."""
    from pydicom.uid import JPEG2000Lossless

    image = gradient()
    path = make_dicom(tmp_path / "j2k.dcm", image, transfer_syntax=JPEG2000Lossless)
    np.testing.assert_array_equal(read_dicom(path).frames[0], image)


def test_dicom_without_extension_is_read_everywhere(tmp_path, make_dicom):
    """PACS exports name files by UID or not at all: the DICM marker, not the name, routes them
    in dataset loading, the mapper (training, evaluation) and sizing, as in predict.py."""
    frames = np.stack([gradient(), 255 - gradient()])
    names = ["IM000001", "1.2.840.99.7"]  # no extension; an extension that says nothing
    for name in names:
        make_dicom(tmp_path / name, frames, ("us", 0.1, 0.1))
        path = str(tmp_path / name)
        assert is_dicom(path)
        np.testing.assert_array_equal(read_grayscale(path), frames[0])
        np.testing.assert_array_equal(read_image(path, "BGR", frame=1)[:, :, 0], frames[1])
        assert image_size(path) == (64, 48)
    coco = {
        "images": [
            {"id": i, "file_name": name, "height": 48, "width": 64, "frame": 1}
            for i, name in enumerate(names)
        ],
        "annotations": [
            {"id": 1, "image_id": 0, "category_id": 1, "bbox": [10, 10, 20, 10], "area": 200,
             "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "benign"}],
    }  # fmt: skip
    (tmp_path / "set.json").write_text(json.dumps(coco))
    records = load_coco(str(tmp_path / "set.json"), str(tmp_path))
    assert [r["frame"] for r in records] == [1, 1]
    assert records[0]["calibration"]["source"] == "SequenceOfUltrasoundRegions"
    mapper = SSDDatasetMapper(is_train=False, augmentations=[], image_format="L")
    for record in records:
        np.testing.assert_array_equal(mapper(record)["image"][0].numpy(), frames[1])


def test_model_image_is_what_the_mapper_reads(tmp_path, make_dicom):
    """What predict.py and evaluate.py --image-labels give a model: a colour file in colour for
    colour configs (not its gray rendering), the gray frame for "L" configs and for DICOM."""
    from thyroid_det.data.dicom import model_image, read_frames

    colour = np.dstack([gradient(), np.zeros((48, 64), np.uint8), np.full((48, 64), 200, np.uint8)])
    png = str(tmp_path / "colour.png")
    Image.fromarray(colour[:, :, ::-1]).save(png)  # PIL writes RGB: the file holds BGR `colour`
    frame = read_frames(png)[0]
    np.testing.assert_array_equal(model_image(png, frame, "BGR"), read_image(png, "BGR"))
    assert model_image(png, frame, "BGR").std(axis=2).max() > 0  # the channels differ
    np.testing.assert_array_equal(model_image(png, frame, "L"), frame.image)
    dcm = make_dicom(tmp_path / "plain.dcm", gradient())
    frame = read_frames(dcm)[0]
    got = model_image(dcm, frame, "BGR")
    assert got.shape == (48, 64, 3) and (got == frame.image[:, :, None]).all()
