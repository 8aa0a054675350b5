"""
Synthetic thyroid ultrasound phantoms: a seeded, deterministic stand-in for TN5000.

Each image is a linear-array B-mode scan: skin, fat with fascia lines, strap muscle and a thyroid
lobe (sometimes a carotid artery beside it) as a map of echogenicity, multiplied by correlated
Rayleigh speckle, attenuated with depth, partly compensated by time-gain, log-compressed to 8 bit
and pasted into a black screen frame. The lobe holds 0-3 nodules whose appearance follows the
ultrasound signs radiologists use (TI-RADS), so the class is learnable from appearance:

* benign: smooth oval, wider than tall; either an-echoic (cyst, with a bright thin wall and
  posterior enhancement) or iso-/hyper-echoic with, usually, a dark halo;
* malignant: hypo-echoic and heterogeneous, taller than wide, lobulated or spiculated margin,
  usually bright micro-calcification foci, sometimes posterior shadowing.

Only numpy and OpenCV are used; image i of a set with seed s depends on (s, i) alone.
"""
import json
import logging
import os
import shutil

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from tqdm import tqdm

from ...utils.file_io import atomic_write_json
from .coco import load_coco, records_to_coco
from .tn5000 import CLASS_NAMES

__all__ = [
    "PHANTOM_VERSION",
    "SYNTHETIC_SETS",
    "render_phantom",
    "generate_phantoms",
    "ensure_phantoms",
    "load_phantoms",
    "register_phantoms",
    "synthetic_root",
]

logger = logging.getLogger(__name__)

# Bump when the rendering changes: cached sets with another version are regenerated.
PHANTOM_VERSION = 1
# The registered sets: the quick start trains on synthetic_train; tests use synthetic_tiny.
SYNTHETIC_SETS = {
    "synthetic_train": {"num_images": 300, "seed": 0, "image_size": (256, 256)},
    "synthetic_val": {"num_images": 60, "seed": 1, "image_size": (256, 256)},
    "synthetic_tiny": {"num_images": 8, "seed": 2, "image_size": (128, 128)},
}
# Probability of 0, 1, 2, 3 nodules in an image.
_NODULE_COUNT_PROBS = (0.1, 0.55, 0.25, 0.1)
# Log compression: echo amplitude _REFERENCE_ECHO maps to white, _DB_RANGE dB below it to black.
_DB_RANGE = 45.0
_REFERENCE_ECHO = 2.0


def synthetic_root():
    """``$THYROID_SYNTHETIC``, else ``$THYROID_DATASETS/synthetic`` (default ``./datasets``)."""
    if os.getenv("THYROID_SYNTHETIC"):
        return os.path.expanduser(os.environ["THYROID_SYNTHETIC"])
    return os.path.join(os.path.expanduser(os.getenv("THYROID_DATASETS", "datasets")), "synthetic")


def render_phantom(seed, height=256, width=256):
    """
    Render one phantom.

    Args:
        seed: anything ``np.random.default_rng`` accepts, e.g. ``np.random.SeedSequence([s, i])``.
        height, width (int): image size in pixels (at least 64).

    Returns:
        image (ndarray): HxW uint8.
        annotations (list[dict]): ``bbox`` (XYXY_ABS, tight around the nodule and its halo),
        ``bbox_mode``, ``category_id`` (0 benign, 1 malignant).
    """
    if min(height, width) < 64:
        raise ValueError(f"Phantoms need at least 64x64 pixels; got {height}x{width}.")
    rng = np.random.default_rng(seed)
    canvas = np.zeros((height, width), np.float32)
    top = int(rng.uniform(0.02, 0.08) * height)
    bottom = int(rng.uniform(0.0, 0.06) * height)
    left = int(rng.uniform(0.0, 0.1) * width)
    right = int(rng.uniform(0.0, 0.1) * width)
    scan_h, scan_w = height - top - bottom, width - left - right
    scan, boxes = _render_scan(rng, scan_h, scan_w)
    canvas[top : top + scan_h, left : left + scan_w] = scan
    canvas += rng.uniform(0, 3, size=canvas.shape).astype(np.float32)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    annotations = [
        {
            "bbox": [x0 + left, y0 + top, x1 + left, y1 + top],
            "bbox_mode": BoxMode.XYXY_ABS,
            "category_id": category_id,
        }
        for category_id, (x0, y0, x1, y1) in boxes
    ]
    return image, annotations


def _smooth_noise(rng, shape, sigma):
    """Gaussian noise low-passed at ``sigma`` px, scaled to unit standard deviation."""
    noise = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma)
    return noise / max(float(noise.std()), 1e-6)


def _contour(rng, cx, cy, rx, ry, wobble, spikes=0, n=128):
    """Polygon of a perturbed ellipse: low harmonics (lobulation) plus triangular spicules."""
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radius = np.ones(n)
    for harmonic in range(2, 7):
        amp = wobble * rng.uniform(0, 1) / (harmonic - 1)
        radius += amp * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi))
    for _ in range(spikes):
        centre, half_width = rng.uniform(0, 2 * np.pi), rng.uniform(0.06, 0.16)
        distance = np.abs(np.angle(np.exp(1j * (theta - centre))))
        radius += rng.uniform(0.12, 0.3) * np.clip(1 - distance / half_width, 0, None)
    return np.stack([cx + rx * radius * np.cos(theta), cy + ry * radius * np.sin(theta)], 1)


def _fill(shape, polygon):
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(polygon * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    return mask.astype(bool)


def _ring(mask, width):
    k = 2 * max(int(round(width)), 1) + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool) & ~mask


def _below(shape, mask, length, strength):
    """Gain map brightening (>0) or shadowing (<0) the columns under ``mask``, fading with depth."""
    rows, cols = np.nonzero(mask)
    gain = np.ones(shape, np.float32)
    if len(rows) == 0:
        return gain
    y_start = rows.max() + 1
    ys = np.arange(y_start, shape[0])
    fade = np.exp(-(ys - y_start) / max(length, 1.0)).astype(np.float32)
    x0, x1 = cols.min(), cols.max() + 1
    profile = np.sin(np.linspace(0, np.pi, x1 - x0 + 2)[1:-1]).astype(np.float32)
    gain[y_start:, x0:x1] += strength * fade[:, None] * profile[None, :]
    return gain


def _render_scan(rng, h, w):
    """The scan area as float gray values in [0, 255] and its nodules [(category, box)]."""
    s = min(h, w) / 256.0
    y = (np.arange(h, dtype=np.float32) / h)[:, None]
    x = (np.arange(w, dtype=np.float32) / w)[None, :]
    echo = 0.25 * (1 + 0.2 * _smooth_noise(rng, (h, w), 10 * s))

    skin = max(int(rng.uniform(0.02, 0.04) * h), 2)
    echo[:skin] = rng.uniform(0.8, 1.1)
    for _ in range(rng.integers(2, 5)):
        y0 = rng.uniform(skin + 2, 0.22 * h)
        xs = np.linspace(0, w - 1, 32)
        ys = y0 + rng.uniform(1, 4) * s * np.sin(xs / w * rng.uniform(2, 6) + rng.uniform(0, 6))
        line = np.round(np.stack([xs, ys], 1) * 16).astype(np.int32)
        cv2.polylines(echo, [line], False, rng.uniform(0.6, 1.0), max(int(1.5 * s), 1), shift=4)

    muscle_top, muscle_bottom = rng.uniform(0.14, 0.2), rng.uniform(0.26, 0.32)
    muscle = (y > muscle_top) & (y < muscle_bottom) & np.ones_like(x, bool)
    striation = 1 + 0.3 * np.sin(2 * np.pi * y * h / (rng.uniform(4, 7) * s))
    echo[muscle] = (0.2 * striation * np.ones_like(x))[muscle]

    gland_level = rng.uniform(0.55, 0.75)
    gx, gy = rng.uniform(0.4, 0.6) * w, rng.uniform(0.55, 0.62) * h
    grx, gry = rng.uniform(0.36, 0.47) * w, rng.uniform(0.2, 0.27) * h
    gland = _fill((h, w), _contour(rng, gx, gy, grx, gry, wobble=0.08))
    texture = 1 + 0.12 * _smooth_noise(rng, (h, w), 3 * s)
    echo[gland] = (gland_level * texture)[gland]
    gain = np.ones((h, w), np.float32)
    occupied = np.zeros((h, w), bool)

    if rng.uniform() < 0.5:
        side = rng.choice([-1, 1])
        r = rng.uniform(0.07, 0.1) * min(h, w)
        vessel = _fill(
            (h, w), _contour(rng, gx + side * (grx + 0.3 * r), gy, r, 0.9 * r, wobble=0.02)
        )
        echo[_ring(vessel, 1.5 * s)] = 0.9
        echo[vessel] = 0.03
        gain *= _below((h, w), vessel, 0.1 * h, 0.3)
        occupied |= _ring(vessel, 3 * s) | vessel

    count = rng.choice(len(_NODULE_COUNT_PROBS), p=_NODULE_COUNT_PROBS)
    boxes = []
    for _ in range(count):
        nodule = _place_nodule(rng, gland, occupied, h, w, s)
        if nodule is None:
            continue
        category_id, shape_mask, extent = nodule
        occupied |= _ring(extent, 4 * s) | extent
        if category_id == 0:
            gain *= _paint_benign(rng, echo, shape_mask, extent & ~shape_mask, gland_level, s)
        else:
            gain *= _paint_malignant(rng, echo, shape_mask, gland_level, s)
        rows, cols = np.nonzero(extent)
        box = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        boxes.append((category_id, [float(v) for v in box]))

    echo = cv2.GaussianBlur(echo * gain, (0, 0), 0.7 * s)
    attenuation = np.exp(-rng.uniform(0.8, 1.6) * y) * (1 + rng.uniform(0.4, 1.2) * y)
    echo *= attenuation * rng.uniform(0.8, 1.25)

    speckle = [
        cv2.GaussianBlur(
            rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigmaX=1.1 * s, sigmaY=0.6 * s
        )
        for _ in range(2)
    ]
    amplitude = np.sqrt(speckle[0] ** 2 + speckle[1] ** 2)
    amplitude /= np.sqrt(np.mean(amplitude**2))
    db = 20 * np.log10(np.maximum(echo * amplitude, 1e-4))
    scan = 255 * np.clip((db - 20 * np.log10(_REFERENCE_ECHO) + _DB_RANGE) / _DB_RANGE, 0, 1)
    return scan.astype(np.float32), boxes


def _place_nodule(rng, gland, occupied, h, w, s):
    """A nodule mostly inside the gland, clear of the others: (class, shape mask, extent mask)."""
    category_id = int(rng.uniform() < 0.5)
    ys, xs = np.nonzero(gland)
    for _ in range(30):
        size = np.exp(rng.uniform(np.log(0.07), np.log(0.36))) * min(h, w)
        if category_id == 0:
            aspect = rng.uniform(1.1, 1.7)
            wobble, spikes = rng.uniform(0.0, 0.05), 0
        else:
            aspect = rng.uniform(0.6, 0.9)
            wobble = rng.uniform(0.08, 0.2)
            spikes = int(rng.integers(3, 10)) if rng.uniform() < 0.75 else 0
        rx, ry = size / 2 * np.sqrt(aspect), size / 2 / np.sqrt(aspect)
        i = rng.integers(len(xs))
        polygon = _contour(rng, xs[i], ys[i], rx, ry, wobble, spikes)
        shape_mask = _fill((h, w), polygon)
        halo = category_id == 0 and rng.uniform() < 0.6
        extent = shape_mask | _ring(shape_mask, max(2.0, 0.05 * size)) if halo else shape_mask
        area = extent.sum()
        if area < 16 or (extent & gland).sum() < 0.8 * area or (extent & occupied).any():
            continue
        return category_id, shape_mask, extent
    return None


def _paint_benign(rng, echo, shape_mask, halo, gland_level, s):
    """A cyst (no halo, 45%) or an iso-/hyper-echoic solid nodule; returns its gain map."""
    if not halo.any() and rng.uniform() < 0.45:
        echo[_ring(shape_mask, 1.0 * s)] = 0.9
        echo[shape_mask] = 0.04
        height = np.ptp(np.nonzero(shape_mask)[0]) + 1
        return _below(echo.shape, shape_mask, 1.2 * height, rng.uniform(0.4, 0.8))
    echo[halo] = rng.uniform(0.05, 0.15)
    texture = 1 + 0.08 * _smooth_noise(rng, echo.shape, 2 * s)
    echo[shape_mask] = (gland_level * rng.uniform(1.2, 1.7) * texture)[shape_mask]
    return np.ones(echo.shape, np.float32)


def _paint_malignant(rng, echo, shape_mask, gland_level, s):
    """Hypo-echoic, heterogeneous, often calcified and shadowing; returns its gain map."""
    texture = 1 + 0.25 * _smooth_noise(rng, echo.shape, 2.5 * s)
    echo[shape_mask] = (gland_level * rng.uniform(0.2, 0.4) * texture)[shape_mask]
    if rng.uniform() < 0.8:
        ys, xs = np.nonzero(cv2.erode(shape_mask.astype(np.uint8), np.ones((5, 5), np.uint8)))
        if len(xs):
            count = min(int(rng.integers(2, 11)), len(xs))
            for j in rng.choice(len(xs), size=count, replace=False):
                cv2.circle(echo, (int(xs[j]), int(ys[j])), max(int(round(s)), 1), 3.0, -1)
    if rng.uniform() < 0.4:
        height = np.ptp(np.nonzero(shape_mask)[0]) + 1
        return _below(echo.shape, shape_mask, 1.5 * height, -rng.uniform(0.3, 0.5))
    return np.ones(echo.shape, np.float32)


def generate_phantoms(output_dir, num_images, seed=0, image_size=(256, 256), overwrite=False):
    """
    Write a phantom set: ``images/NNNNNN.png`` and ``annotations.json`` (COCO; categories
    1 benign, 2 malignant). The set is built in a temporary folder next to ``output_dir`` and
    renamed into place, so a reader never sees half of it.

    Args:
        output_dir (str): the set's folder; it must not exist unless ``overwrite``.
        num_images (int): images in the set.
        seed (int): image i is rendered from ``SeedSequence([seed, i])``.
        image_size (tuple[int, int]): (height, width).

    Returns:
        str: the path of ``annotations.json``.
    """
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir} exists; pass overwrite=True to replace it.")
    height, width = (int(v) for v in image_size)
    tmp_dir = f"{output_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(os.path.join(tmp_dir, "images"))
    try:
        records = []
        for i in tqdm(range(num_images), desc=f"Phantoms -> {output_dir}", unit="img"):
            image, annotations = render_phantom(np.random.SeedSequence([seed, i]), height, width)
            file_name = os.path.join(tmp_dir, "images", f"{i:06d}.png")
            if not cv2.imwrite(file_name, image):
                raise OSError(f"Cannot write {file_name}.")
            records.append(
                {"file_name": file_name, "image_id": i + 1, "height": height, "width": width,
                 "annotations": annotations}
            )
        coco = records_to_coco(records, CLASS_NAMES, os.path.join(tmp_dir, "images"))
        coco["info"] = _set_info(num_images, seed, image_size)
        atomic_write_json(os.path.join(tmp_dir, "annotations.json"), coco, indent=None)
        _replace_dir(tmp_dir, output_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return os.path.join(output_dir, "annotations.json")


def _set_info(num_images, seed, image_size):
    return {
        "description": "thyroid_det synthetic ultrasound phantoms",
        "version": PHANTOM_VERSION,
        "num_images": int(num_images),
        "seed": int(seed),
        "image_size": [int(v) for v in image_size],
    }


def _replace_dir(src, dst):
    old = f"{dst}.old-{os.getpid()}"
    if os.path.exists(dst):
        os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def _read_info(json_file):
    try:
        with open(json_file) as f:
            return json.load(f).get("info")
    except (OSError, ValueError):
        return None


def ensure_phantoms(output_dir, num_images, seed=0, image_size=(256, 256)):
    """
    The ``annotations.json`` of a phantom set in ``output_dir``, generating the set if it is
    missing or was made with other parameters or another ``PHANTOM_VERSION``.
    """
    json_file = os.path.join(output_dir, "annotations.json")
    wanted = _set_info(num_images, seed, image_size)
    if _read_info(json_file) == wanted:
        return json_file
    logger.info(f"Generating {num_images} synthetic phantoms (seed {seed}) in {output_dir} ...")
    try:
        return generate_phantoms(output_dir, num_images, seed, image_size, overwrite=True)
    except OSError:
        if _read_info(json_file) == wanted:  # another process finished the same set first
            return json_file
        raise


def load_phantoms(name, num_images, seed=0, image_size=(256, 256), root=None):
    """
    Dataset dicts of a phantom set kept in ``root/name`` (default :func:`synthetic_root`),
    generated there on first use. Boxes are XYXY_ABS, as in every thyroid_det dataset.
    """
    output_dir = os.path.join(root if root is not None else synthetic_root(), name)
    json_file = ensure_phantoms(output_dir, num_images, seed, image_size)
    records = load_coco(json_file, os.path.join(output_dir, "images"), name)
    for record in records:
        for ann in record["annotations"]:
            ann["bbox"] = BoxMode.convert(ann["bbox"], ann["bbox_mode"], BoxMode.XYXY_ABS)
            ann["bbox_mode"] = BoxMode.XYXY_ABS
    return records


def register_phantoms(name, num_images, seed=0, image_size=(256, 256), root=None):
    """Register a phantom set under ``name``; it is generated when first loaded."""
    DatasetCatalog.register(
        name, lambda: load_phantoms(name, num_images, seed, image_size, root)
    )
    MetadataCatalog.get(name).set(thing_classes=list(CLASS_NAMES), evaluator_type="coco")
