"""Fixtures shared by every test folder: real data, configs (make_cfg, tiny model settings),
phantoms, random weights, the tools/ scripts as modules."""
import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


def find_tn5000_datasets():
    """The folder holding TN5000/: $THYROID_DATASETS, ./datasets or ../shared/data, else None."""
    shared = os.path.join(REPO, "..", "shared", "data")
    for root in (os.getenv("THYROID_DATASETS"), "datasets", shared):
        if root and os.path.isdir(os.path.join(root, "TN5000", "Annotations")):
            return root
    return None


@pytest.fixture
def tn5000_datasets(monkeypatch):
    """THYROID_DATASETS pointed at the real TN5000 for the test; skips when it is absent."""
    root = find_tn5000_datasets()
    if root is None:
        pytest.skip("TN5000 not found (set THYROID_DATASETS)")
    monkeypatch.setenv("THYROID_DATASETS", root)
    return root


def write_dicom(path, pixels, calibration=None, transfer_syntax=None, modality="US"):
    """Write a small DICOM file with pydicom.

    Args:
        pixels (ndarray): HxW (MONOCHROME2), HxWx3 (RGB) or FxHxW / FxHxWx3 (multi-frame), uint8
            or uint16.
        calibration: None, ``("us", mm_per_px_x, mm_per_px_y)`` (one 2D tissue region over the
            image, PhysicalDelta in cm), ``("us_regions", [(x0, y0, x1, y1, dx_mm, dy_mm), ...])``
            or ``("spacing", row_mm, col_mm)`` (PixelSpacing).
        transfer_syntax: None (explicit VR little endian) or a compressed syntax UID pydicom
            can encode (e.g. ``pydicom.uid.RLELossless``).
    """
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = np.asarray(pixels)
    colour = pixels.shape[-1] == 3 and pixels.ndim in (3, 4)
    multi = pixels.ndim == (4 if colour else 3)
    sop_class = {
        ("US", False): "1.2.840.10008.5.1.4.1.1.6.1",
        ("US", True): "1.2.840.10008.5.1.4.1.1.3.1",
    }.get((modality, multi), "1.2.840.10008.5.1.4.1.1.7")  # else Secondary Capture
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = "TEST"
    bits = 16 if pixels.dtype == np.uint16 else 8
    ds.set_pixel_data(pixels, "RGB" if colour else "MONOCHROME2", bits)
    height, width = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    if calibration and calibration[0] in ("us", "us_regions"):
        regions = calibration[1] if calibration[0] == "us_regions" else [
            (0, 0, width - 1, height - 1, calibration[1], calibration[2])
        ]
        items = []
        for x0, y0, x1, y1, dx, dy in regions:
            item = Dataset()
            item.RegionSpatialFormat = 1
            item.RegionDataType = 1
            item.RegionLocationMinX0, item.RegionLocationMinY0 = x0, y0
            item.RegionLocationMaxX1, item.RegionLocationMaxY1 = x1, y1
            item.PhysicalUnitsXDirection = item.PhysicalUnitsYDirection = 3  # cm
            item.PhysicalDeltaX, item.PhysicalDeltaY = dx / 10.0, dy / 10.0
            items.append(item)
        ds.SequenceOfUltrasoundRegions = Sequence(items)
    elif calibration and calibration[0] == "spacing":
        ds.PixelSpacing = [calibration[1], calibration[2]]
    if transfer_syntax is not None:
        ds.compress(transfer_syntax)
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


@pytest.fixture(scope="session")
def make_dicom():
    """``make_dicom(path, pixels, calibration=None, transfer_syntax=None)``: see write_dicom."""
    return write_dicom


# Overrides that make any SSD/MC-CNN config CPU-test sized: 1/16 of VGG's width, 128 px input,
# a 64 px, 16-wide refiner, 10 detections per image.
TINY_MODEL = {
    "MODEL.DEVICE": "cpu",
    "MODEL.VGG.WIDTH_MULT": "0.0625",
    "INPUT.FIXED_SIZE": "(128, 128)",
    "MODEL.REFINER.WIDTH_MULT": "0.125",
    "MODEL.REFINER.FC_DIM": "16",
    "MODEL.REFINER.INPUT_SIZE": "64",
    "DATALOADER.NUM_WORKERS": "0",
    "TEST.NODULE_EVAL.BOOTSTRAP": "20",
    "TEST.DETECTIONS_PER_IMAGE": "10",
}


def make_cfg(config=None, opts=(), tiny=False):
    """
    The config every test builds: get_cfg -> add_mccnn_config -> merge ``config`` -> merge
    TINY_MODEL (``tiny``) -> merge ``opts``; not frozen, so a test may set keys after.

    Args:
        config (str or None): a file name in configs/ or a path; None: the defaults alone.
        opts (list or dict): config overrides, ``[KEY, VALUE, ...]`` or ``{KEY: VALUE}``.
        tiny (bool): apply TINY_MODEL's CPU-test sizes before ``opts``.
    """
    from detectron2.config import get_cfg

    from thyroid_det import add_mccnn_config

    cfg = get_cfg()
    add_mccnn_config(cfg)
    if config is not None:
        cfg.merge_from_file(config if os.path.dirname(config) else os.path.join(CONFIGS, config))
    if isinstance(opts, dict):
        opts = [item for pair in opts.items() for item in pair]
    cfg.merge_from_list(([item for pair in TINY_MODEL.items() for item in pair] if tiny else [])
                        + list(opts))  # fmt: skip
    return cfg


@pytest.fixture(scope="session")
def tiny_opts():
    """TINY_MODEL as command-line ``KEY VALUE`` overrides."""
    return [item for pair in TINY_MODEL.items() for item in pair]


@pytest.fixture(scope="session")
def tool():
    """``tool(name)`` imports ``tools/<name>.py`` as a module (tools/ is not a package);
    ``tool(name, "scripts")`` a script of ``scripts/``."""

    def load(name, folder="tools"):
        path = os.path.join(REPO, folder, f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"thyroid_det_{folder}_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def _phantom_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture
def phantom_root(_phantom_dir, monkeypatch):
    """Phantom sets (synthetic_tiny, ...) are generated once per session, into a temp folder."""
    monkeypatch.setenv("THYROID_SYNTHETIC", str(_phantom_dir))
    return _phantom_dir


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory):
    """``random_weights(config_file)``: a checkpoint of the config's tiny model, seeded random
    weights, built once per config and session."""
    cache = {}

    def make(config_file):
        if config_file not in cache:
            cache[config_file] = _save_random_weights(
                config_file, tmp_path_factory.mktemp("weights")
            )
        return cache[config_file]

    return make


def _save_random_weights(config_file, out_dir):
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    cfg = make_cfg(config_file, tiny=True)
    torch.manual_seed(0)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(out_dir)).save("random")
    return os.path.join(str(out_dir), "random.pth")
