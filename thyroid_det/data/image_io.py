"""The one image reader of the project: training, evaluation, prediction and conversion all call it.

detectron2's ``read_image`` saturates 16-bit images (PIL's "I;16" -> "L" clips at 255), and
libjpeg fills the missing rows of a truncated JPEG with grey without an error. This reader decodes
with OpenCV, which keeps 16 bits and applies the EXIF orientation, and handles every kind of file
the same way wherever it is read:

* 8-bit or 16-bit; 16-bit becomes 8-bit by ``scale_16bit``: "full" maps 0..65535 linearly onto
  0..255 (value / 257: exact for 8-bit data stored as 16-bit), "minmax" stretches the image's own
  min..max onto 0..255 (for 10/12-bit exports);
* gray, colour (BGR) or with alpha (dropped); colour -> gray by ITU-R 601 luma (OpenCV's);
* EXIF orientation applied (as detectron2's ``read_image`` and the TN5000 loader's sizes do);
* refused, with :class:`UnreadableImage` naming the problem: a missing, corrupt or truncated file
  (a JPEG without its end-of-image marker after the last scan), an unsupported pixel type, a side
  below ``MIN_IMAGE_SIDE`` or more than ``MAX_IMAGE_PIXELS`` pixels.

Formats that OpenCV cannot decode (DICOM, ...) plug in through :func:`register_decoder`, which
routes a file by what it is, not only by its name: PACS exports often name DICOM files by their
UID or not at all, and every reader here must take them as predict.py does.
"""

import cv2
import numpy as np
from PIL import Image

__all__ = [
    "MAX_IMAGE_PIXELS",
    "MIN_IMAGE_SIDE",
    "UnreadableImage",
    "image_size",
    "read_grayscale",
    "read_image",
    "register_decoder",
]

# Below this side an image holds no nodule the model could see: upscaled to the input size it
# yields boxes on nothing (a 1x1 image gave 100 detections).
MIN_IMAGE_SIDE = 32
# 16k x 16k: far above any ultrasound frame; larger files are decompression bombs or mistakes.
MAX_IMAGE_PIXELS = 1 << 28
# (accepts(path) -> bool, decode(path, frame) -> ndarray), asked in order of registration.
_DECODERS = []
_EXIF_ORIENTATION = 0x0112


class UnreadableImage(OSError):
    """An image file that cannot be used; the message says why (the caller names the file)."""


def register_decoder(accepts, decode):
    """Route the files for which ``accepts(path)`` is true to ``decode(path, frame) -> ndarray``
    (HxW or HxWxC BGR, uint8 or uint16; ``frame``: 0-based, for multi-frame formats such as
    DICOM cine); its array then goes through the same conversion and checks as any other.
    ``accepts`` should look at the file's header where the name may not say (DICOM's "DICM"
    marker: :func:`thyroid_det.data.dicom.is_dicom`), and be cheap: every read and size asks it."""
    _DECODERS.append((accepts, decode))


def _decoder_for(path):
    """The registered decoder that accepts ``path``, or None for OpenCV's formats."""
    for accepts, decode in _DECODERS:
        if accepts(path):
            return decode
    return None


def _decode(path, frame=0):
    decode = _decoder_for(path)
    if decode is not None:
        return decode(path, frame)
    if frame:
        raise UnreadableImage(f"a single-frame image; frame {frame} asked for")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise UnreadableImage("no such file") from None
    except OSError as e:
        raise UnreadableImage(f"cannot open ({e.strerror or e})") from None
    if data[:2].tobytes() == b"\xff\xd8" and not _jpeg_is_complete(data.tobytes()):
        raise UnreadableImage("truncated JPEG (no end-of-image marker after the last scan)")
    # ANYCOLOR|ANYDEPTH: 16 bits kept, alpha dropped, EXIF orientation applied.
    image = cv2.imdecode(data, cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH) if data.size else None
    if image is None:
        raise UnreadableImage("not a readable image (corrupt, truncated or unsupported format)")
    return image


def _jpeg_is_complete(data):
    """Whether an end-of-image marker follows the last start-of-scan. Entropy-coded data never
    holds 0xFF followed by a marker byte, so neither can appear inside a scan."""
    last_scan = data.rfind(b"\xff\xda")
    return last_scan >= 0 and data.find(b"\xff\xd9", last_scan) >= 0


def _to_uint8(image, scale_16bit):
    if image.dtype == np.uint8:
        return image
    if image.dtype != np.uint16:
        raise UnreadableImage(f"unsupported pixel type {image.dtype} (8- or 16-bit images only)")
    if scale_16bit == "minmax":
        low, high = float(image.min()), float(image.max())
        image = (image.astype(np.float32) - low) * (255.0 / max(high - low, 1.0))
    elif scale_16bit == "full":
        image = image.astype(np.float32) / 257.0
    else:
        raise ValueError(f"scale_16bit must be 'full' or 'minmax', not {scale_16bit!r}")
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def read_image(path, format="L", scale_16bit="full", frame=0):
    """
    Read an image file for the model.

    Args:
        path (str): the file.
        format (str): "L" (gray), "BGR" or "RGB", as ``INPUT.FORMAT``.
        scale_16bit (str): "full" or "minmax", see the module docstring.
        frame (int): the frame of a multi-frame file (a record's ``"frame"``), 0-based.

    Returns:
        ndarray: HxWx1 (for "L") or HxWx3 uint8, as detectron2's ``read_image`` returns.

    Raises:
        UnreadableImage: the file cannot be used; the message says why.
    """
    if format not in ("L", "BGR", "RGB"):
        raise ValueError(f"unsupported image format {format!r} (L, BGR or RGB)")
    image = _decode(path, frame)
    height, width = image.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise UnreadableImage(
            f"too small ({width}x{height} px; the smallest side accepted is {MIN_IMAGE_SIDE} px)"
        )
    if height * width > MAX_IMAGE_PIXELS:
        raise UnreadableImage(f"too large ({width}x{height} px; at most {MAX_IMAGE_PIXELS} pixels)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 4:  # a decoder that kept the alpha channel
        image = image[:, :, :3]
    image = _to_uint8(image, scale_16bit)
    if format == "L":
        gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        return gray[:, :, None]
    bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image
    return bgr[:, :, ::-1].copy() if format == "RGB" else bgr


def read_grayscale(path, scale_16bit="full"):
    """:func:`read_image` as an HxW uint8 grayscale array."""
    return read_image(path, "L", scale_16bit)[:, :, 0]


def image_size(path):
    """(width, height) of the image as :func:`read_image` returns it (EXIF orientation applied),
    from the file's header where PIL can read it, else by decoding it."""
    if _decoder_for(path) is None:
        try:
            with Image.open(path) as im:
                width, height = im.size
                if im.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                    width, height = height, width
                return width, height
        except (OSError, ValueError, SyntaxError):  # PIL's errors for files it cannot parse
            pass
    height, width = _decode(path).shape[:2]
    return width, height
