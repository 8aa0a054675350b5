"""DICOM ultrasound input: frames as the HxW uint8 grayscale the models take, plus the physical
calibration that turns a box in pixels into millimetres.

Reads what pydicom reads: Ultrasound (single and multi-frame) and Secondary Capture objects,
uncompressed or in any transfer syntax one of pydicom's pixel-data plugins decodes (RLE natively;
JPEG baseline with Pillow; JPEG lossless/LS and JPEG 2000 with pylibjpeg, installed with
thyroid_det). MONOCHROME1/2, RGB and YBR_* photometric interpretations; colour becomes grayscale
with ITU-R 601 luma (PIL's "L"), as colour image files do. Data over 8 bits goes through the
file's VOI LUT or window when it has one, else its full stored range, onto 0..255.

Calibration (:class:`Calibration`) comes from ``SequenceOfUltrasoundRegions`` (the regions whose
physical units are centimetres in both directions: PhysicalDeltaX/Y per pixel, and the region's
pixel bounds) or, failing that, ``PixelSpacing`` (the whole image). A box is measured in the
region that contains it; a file with neither is uncalibrated, and sizes say so.
"""

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import List, NamedTuple, Optional

import numpy as np
from PIL import Image

from .image_io import read_grayscale, read_image, register_decoder

__all__ = [
    "DICOM_EXTENSIONS",
    "add_dicom_fields",
    "Calibration",
    "CalibratedRegion",
    "DicomError",
    "DicomImage",
    "Frame",
    "box_size_mm",
    "decode_frame",
    "is_dicom",
    "model_image",
    "read_dicom",
    "read_dicom_header",
    "read_frames",
]

DICOM_EXTENSIONS = (".dcm", ".dicom")
# PhysicalUnitsX/YDirection code for centimetres (DICOM PS3.3 C.8.5.5.1.15); other codes
# (seconds, hertz, dB, cm/s, ...) are not spatial.
UNITS_CM = 3


class DicomError(OSError):
    """A file that is not DICOM, has no image, or whose pixel data no installed plugin decodes
    (an OSError, as :class:`~thyroid_det.data.image_io.UnreadableImage`: a file that cannot be
    used)."""


@dataclass(frozen=True)
class CalibratedRegion:
    """A rectangle of the image, in pixels (``x1``/``y1`` inclusive, as DICOM's MaxX1/MaxY1),
    with its millimetres per pixel."""

    x0: float
    y0: float
    x1: float
    y1: float
    mm_per_px_x: float
    mm_per_px_y: float

    def contains(self, box, tolerance=1.0):
        x0, y0, x1, y1 = box
        t = tolerance
        return (
            x0 >= self.x0 - t and y0 >= self.y0 - t and x1 <= self.x1 + 1 + t and y1 <= self.y1 + 1 + t
        )


@dataclass(frozen=True)
class Calibration:
    """How pixels map to millimetres in one DICOM file.

    Attributes:
        source: "SequenceOfUltrasoundRegions" or "PixelSpacing".
        regions: the calibrated rectangles (one covering the image for PixelSpacing).
    """

    source: str
    regions: tuple

    def region_for(self, box):
        """The region that contains ``box`` (XYXY pixels): the smallest one, else None."""
        inside = [r for r in self.regions if r.contains(box)]
        return min(inside, key=lambda r: (r.x1 - r.x0) * (r.y1 - r.y0)) if inside else None

    def to_dict(self):
        """JSON-able form, as dataset records carry it (``record["calibration"]``)."""
        return {"source": self.source, "regions": [asdict(r) for r in self.regions]}

    @classmethod
    def from_dict(cls, d):
        return cls(d["source"], tuple(CalibratedRegion(**r) for r in d["regions"]))


class DicomImage(NamedTuple):
    """What :func:`read_dicom` returns.

    Attributes:
        frames: HxW uint8 grayscale frames, one per frame of the file.
        calibration: a :class:`Calibration`, or None when the file carries none.
        info: modality, SOP class, photometric interpretation, transfer syntax, frame count.
    """

    frames: List[np.ndarray]
    calibration: Optional[Calibration]
    info: dict


def is_dicom(path):
    """Whether ``path`` is a DICOM file: a .dcm/.dicom name, or the "DICM" preamble marker (PACS
    exports name files by UID or not at all). Every reader routes by it: image_io's decoder,
    :func:`read_frames` and :func:`add_dicom_fields`."""
    if path.lower().endswith(DICOM_EXTENSIONS):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _dcmread(path, stop_before_pixels):
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not os.path.isfile(path):
        raise DicomError("no such file")
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as e:
        raise DicomError(f"not a DICOM file ({e})") from None
    except Exception as e:  # truncated or malformed data elements
        raise DicomError(f"unreadable DICOM ({type(e).__name__}: {e})") from None


def calibration_of(ds):
    """The :class:`Calibration` of a pydicom Dataset, or None when it has no spatial one."""
    regions = []
    for item in ds.get("SequenceOfUltrasoundRegions", []):
        units = (item.get("PhysicalUnitsXDirection"), item.get("PhysicalUnitsYDirection"))
        dx, dy = item.get("PhysicalDeltaX"), item.get("PhysicalDeltaY")
        if units != (UNITS_CM, UNITS_CM) or not dx or not dy:
            continue  # a Doppler strip, an M-mode trace or an uncalibrated region
        regions.append(
            CalibratedRegion(
                x0=float(item.get("RegionLocationMinX0", 0)),
                y0=float(item.get("RegionLocationMinY0", 0)),
                x1=float(item.get("RegionLocationMaxX1", ds.get("Columns", 1) - 1)),
                y1=float(item.get("RegionLocationMaxY1", ds.get("Rows", 1) - 1)),
                mm_per_px_x=abs(float(dx)) * 10.0,
                mm_per_px_y=abs(float(dy)) * 10.0,
            )
        )
    if regions:
        return Calibration("SequenceOfUltrasoundRegions", tuple(regions))
    spacing = ds.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2 and float(spacing[0]) > 0 and float(spacing[1]) > 0:
        # PixelSpacing is (row spacing, column spacing) = (y, x), in mm.
        whole = CalibratedRegion(
            0.0, 0.0, float(ds.Columns - 1), float(ds.Rows - 1), float(spacing[1]), float(spacing[0])
        )
        return Calibration("PixelSpacing", (whole,))
    return None


def box_size_mm(calibration, box):
    """Physical size of an XYXY pixel box.

    Returns:
        dict: ``width_mm``, ``height_mm`` and ``diameter_mm`` (equivalent diameter,
        sqrt(width * height): the diameter of the circle with the area of the ellipse inscribed in
        the box, the pixel size the evaluator groups by) and ``calibration`` (its source); or
        ``{"calibration": "none", "reason": ...}`` when the box cannot be measured.
    """
    if isinstance(calibration, dict):
        calibration = Calibration.from_dict(calibration)
    if calibration is None:
        return {"calibration": "none", "reason": "the file carries no physical calibration"}
    region = calibration.region_for(box)
    if region is None:
        return {"calibration": "none", "reason": "the box lies outside every calibrated region"}
    width = max(float(box[2]) - float(box[0]), 0.0) * region.mm_per_px_x
    height = max(float(box[3]) - float(box[1]), 0.0) * region.mm_per_px_y
    return {
        "width_mm": round(width, 2),
        "height_mm": round(height, 2),
        "diameter_mm": round(math.sqrt(width * height), 2),
        "calibration": calibration.source,
    }


def _info(ds, path):
    meta = getattr(ds, "file_meta", None)
    return {
        "modality": str(ds.get("Modality", "")),
        "sop_class": str(ds.get("SOPClassUID", "")),
        "photometric": str(ds.get("PhotometricInterpretation", "")),
        "transfer_syntax": str(meta.get("TransferSyntaxUID", "")) if meta is not None else "",
        "num_frames": int(ds.get("NumberOfFrames", 1) or 1),
        "rows": int(ds.get("Rows", 0)),
        "columns": int(ds.get("Columns", 0)),
    }


def read_dicom_header(path):
    """``(info, calibration)`` of a DICOM file without decoding its pixels (dataset loading)."""
    ds = _dcmread(path, stop_before_pixels=True)
    return _info(ds, path), calibration_of(ds)


def _to_uint8(frames, ds):
    """(F, H, W[, 3]) decoded pixels -> (F, H, W) uint8 grayscale."""
    from pydicom.pixels import apply_voi_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if frames.ndim == 4:  # RGB (pydicom converts YBR_* to RGB when it decodes)
        if frames.dtype != np.uint8:
            high = float(2 ** int(ds.get("BitsStored", 8)) - 1)
            frames = np.clip(np.round(frames.astype(np.float32) * (255.0 / high)), 0, 255)
            frames = frames.astype(np.uint8)
        return np.stack([np.asarray(Image.fromarray(f, "RGB").convert("L")) for f in frames])
    bits = int(ds.get("BitsStored", 8))
    if frames.dtype == np.uint8 and bits <= 8:
        out = frames
    else:
        windowed = "WindowCenter" in ds or "VOILUTSequence" in ds
        values = np.stack(
            [apply_voi_lut(f, ds) if windowed else f for f in frames]
        ).astype(np.float32)
        if windowed or int(ds.get("PixelRepresentation", 0)) == 1:
            low, high = float(values.min()), float(values.max())
        else:
            low, high = 0.0, float(2**bits - 1)
        out = np.clip(np.round((values - low) * (255.0 / max(high - low, 1.0))), 0, 255)
        out = out.astype(np.uint8)
    if photometric == "MONOCHROME1":  # 0 is white
        out = 255 - out
    return out


def read_dicom(path, frame=None):
    """Decode every frame of a DICOM file, or only frame ``frame`` (0-based).

    Returns:
        DicomImage: HxW uint8 frames, the calibration (or None) and a few header fields.

    Raises:
        DicomError: with a one-line reason (not DICOM, no pixel data, an undecodable syntax).
    """
    ds = _dcmread(path, stop_before_pixels=False)
    info = _info(ds, path)
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise DicomError("DICOM file without pixel data")
    if frame is not None and not 0 <= frame < info["num_frames"]:
        raise DicomError(f"has {info['num_frames']} frame(s); frame {frame} asked for")
    try:
        if frame is not None and info["num_frames"] > 1:
            ds.pixel_array_options(index=frame)  # decode that frame only
        pixels = ds.pixel_array
    except Exception as e:  # no plugin for the transfer syntax, or corrupt fragments
        syntax = info["transfer_syntax"] or "unknown"
        raise DicomError(
            f"cannot decode pixel data (transfer syntax {syntax}: {type(e).__name__}: {e})"
        ) from None
    colour = int(ds.get("SamplesPerPixel", 1)) == 3
    if pixels.ndim == (3 if colour else 2):
        pixels = pixels[None]
    frames = _to_uint8(np.asarray(pixels), ds)
    return DicomImage([np.ascontiguousarray(f) for f in frames], calibration_of(ds), info)


def decode_frame(path, frame=0):
    """One frame as HxW uint8: the decoder :mod:`thyroid_det.data.image_io` uses for DICOM."""
    return read_dicom(path, frame=frame).frames[0]


class Frame(NamedTuple):
    """One image the model sees: ``index`` (the frame of a multi-frame DICOM, else None),
    ``image`` (HxW uint8) and ``calibration`` (a :class:`Calibration` or None)."""

    index: Optional[int]
    image: np.ndarray
    calibration: Optional[Calibration]


def read_frames(path, scale_16bit="full"):
    """Every frame of an image or DICOM file, with its calibration: what tools/predict.py and
    tools/evaluate.py run the model on. Raises UnreadableImage / DicomError naming the problem."""
    if not is_dicom(path):
        return [Frame(None, read_grayscale(path, scale_16bit), None)]
    dicom = read_dicom(path)
    multi = len(dicom.frames) > 1
    return [Frame(i if multi else None, f, dicom.calibration) for i, f in enumerate(dicom.frames)]


def model_image(path, frame, image_format, scale_16bit="full"):
    """
    The array :class:`thyroid_det.engine.Predictor` takes for ``frame`` (of :func:`read_frames`)
    of ``path``, as evaluation's mapper reads the file: the gray frame for "L" configs and for
    DICOM; for colour configs an image file is read again as BGR, so that a colour overlay reaches
    a model that keeps three channels (the peers) as it did in evaluation.
    """
    if image_format == "L":
        return frame.image
    if is_dicom(path):
        return np.repeat(frame.image[:, :, None], 3, axis=2)
    return read_image(path, "BGR", scale_16bit)


def add_dicom_fields(records, json_file=None):
    """Give the dataset records whose file is DICOM what evaluation needs, in place:
    ``"calibration"`` (:meth:`Calibration.to_dict`, when the file has one) and ``"frame"`` (from
    the COCO image entry's ``"frame"`` key in ``json_file``, 0-based; default 0), checked against
    the file's frame count. Reads headers only. Raises DicomError naming the file."""
    # Missing files are left to the reader, which names them.
    dicom = [r for r in records if is_dicom(r["file_name"]) and os.path.isfile(r["file_name"])]
    if not dicom:
        return records
    frames = {}
    if json_file is not None:
        with open(json_file, encoding="utf-8") as f:
            frames = {im["id"]: im["frame"] for im in json.load(f)["images"] if "frame" in im}
    for record in dicom:
        path = record["file_name"]
        try:
            info, calibration = read_dicom_header(path)
        except DicomError as e:
            raise DicomError(f"{path}: {e}") from None
        frame = int(frames.get(record.get("image_id"), record.get("frame", 0)))
        if not 0 <= frame < info["num_frames"]:
            raise DicomError(f"{path}: has {info['num_frames']} frame(s); frame {frame} asked for")
        record["frame"] = frame
        if calibration is not None:
            record["calibration"] = calibration.to_dict()
    return records


register_decoder(is_dicom, decode_frame)
