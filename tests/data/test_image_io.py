"""The one image reader: every path (training mapper, evaluation, predict.py, converter) gives the
same array for the same file; truncated, tiny and unsupported files are refused by name."""
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from thyroid_det.data.image_io import UnreadableImage, image_size, read_grayscale, read_image
from thyroid_det.data.mapper import SSDDatasetMapper

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def gradient16(height=48, width=64):
    """A 16-bit image spanning the whole range: detectron2's read_image saturated most of it."""
    return (np.arange(height * width, dtype=np.float64).reshape(height, width) * 65535
            / (height * width - 1)).astype(np.uint16)  # fmt: skip


def mapper_array(path):
    mapper = SSDDatasetMapper(is_train=False, augmentations=[], image_format="L")
    return mapper({"file_name": path, "image_id": 0})["image"][0].numpy()


def test_every_path_reads_a_16bit_png_alike(tmp_path, tool, random_weights, tiny_opts):
    path = str(tmp_path / "in" / "scan16.png")
    os.makedirs(os.path.dirname(path))
    cv2.imwrite(path, gradient16())
    expected = np.round(gradient16() / 257.0).astype(np.uint8)
    assert np.array_equal(read_grayscale(path), expected)
    assert np.array_equal(mapper_array(path), expected)  # training and evaluation
    record = {"file_name": path, "height": 48, "width": 64, "annotations": []}
    out = tool("convert_tn5000_to_coco").reencode(record, str(tmp_path / "out"), 0, "png", 0)
    assert np.array_equal(cv2.imread(out["file_name"], cv2.IMREAD_UNCHANGED), expected)
    # predict.py on the 16-bit file predicts exactly what it predicts on the expected 8 bits.
    config = os.path.join(REPO, "configs", "mssd_vgg16_synthetic.yaml")
    predict = tool("predict")
    argv = ["--config-file", config, "--weights", random_weights(config), "--min-score", "0",
            "--json-mode", "single", "--input", path, out["file_name"]]  # fmt: skip
    images = predict.main(argv + ["--output", str(tmp_path / "pred")] + tiny_opts)["images"]
    assert len(images) == 2 and images[0]["detections"] == images[1]["detections"]


def test_gray_colour_alpha_and_exif_read_alike(tmp_path):
    gray = (np.arange(48 * 64).reshape(48, 64) % 251).astype(np.uint8)
    files = {
        "gray.png": gray,
        "colour.png": cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR),
        "alpha.png": cv2.cvtColor(gray, cv2.COLOR_GRAY2BGRA),
    }
    for name, pixels in files.items():
        cv2.imwrite(str(tmp_path / name), pixels)
        assert np.array_equal(read_grayscale(str(tmp_path / name)), gray), name
        assert read_image(str(tmp_path / name), "BGR").shape == (48, 64, 3), name
    # EXIF orientation 6 (rotate 90 degrees clockwise to display), as detectron2 applies it.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(gray).save(tmp_path / "rotated.png", exif=exif)
    rotated = np.rot90(gray, k=-1)
    assert np.array_equal(read_grayscale(str(tmp_path / "rotated.png")), rotated)
    assert np.array_equal(mapper_array(str(tmp_path / "rotated.png")), rotated)
    assert image_size(str(tmp_path / "rotated.png")) == (48, 64)


def truncated_jpeg(tmp_path):
    path = tmp_path / "cut.jpg"
    rng = np.random.default_rng(0)
    cv2.imwrite(str(path), rng.integers(0, 255, (96, 128), np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return str(path)


def test_truncated_jpeg_is_refused_everywhere(tmp_path, tool):
    path = truncated_jpeg(tmp_path)
    with pytest.raises(UnreadableImage, match="truncated JPEG"):
        read_grayscale(path)
    with pytest.raises(UnreadableImage, match="Cannot read image .*cut.jpg.*truncated"):
        mapper_array(path)
    record = {"file_name": path, "height": 96, "width": 128, "annotations": []}
    with pytest.raises(UnreadableImage, match="cut.jpg: truncated JPEG"):
        tool("convert_tn5000_to_coco").reencode(record, str(tmp_path / "out"), 0, "png", 0)
    assert not os.path.exists(tmp_path / "out" / "cut.png")
    # A complete JPEG with bytes after its end marker still reads.
    cv2.imwrite(str(tmp_path / "tail.jpg"), np.full((40, 40), 90, np.uint8))
    with open(tmp_path / "tail.jpg", "ab") as f:
        f.write(b"trailer")
    assert read_grayscale(str(tmp_path / "tail.jpg")).shape == (40, 40)


@pytest.mark.parametrize(
    "pixels, message",
    [
        (np.zeros((1, 1), np.uint8), r"too small \(1x1 px"),
        (np.zeros((20, 300), np.uint8), r"too small \(300x20 px"),
        (np.zeros((40, 40), np.float32), "unsupported pixel type float32"),
    ],
)
def test_unusable_images_are_refused(tmp_path, pixels, message):
    path = str(tmp_path / ("image.tiff" if pixels.dtype == np.float32 else "image.png"))
    cv2.imwrite(path, pixels)
    with pytest.raises(UnreadableImage, match=message):
        read_grayscale(path)
    with pytest.raises(UnreadableImage, match="no such file"):
        read_grayscale(str(tmp_path / "absent.png"))


def test_sixteen_bit_scaling(tmp_path):
    path = str(tmp_path / "twelve_bit.png")
    cv2.imwrite(path, np.tile(np.array([0, 1000, 4095], dtype=np.uint16), (32, 11))[:, :32])
    assert read_grayscale(path, "full")[0, :3].tolist() == [0, 4, 16]
    assert read_grayscale(path, "minmax")[0, :3].tolist() == [0, 62, 255]
