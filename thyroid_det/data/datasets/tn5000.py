"""TN5000 thyroid nodule data set (Pascal VOC layout) as detectron2 dataset dicts.

Layout, under a folder called ``TN5000``::

    Annotations/<id>.xml      one VOC annotation per image file
    JPEGImages/<id>.jpg
    ImageSets/Main/{train,val,trainval,test}.txt    image ids, one a line (test is optional)

TN5000 stores an image with several nodules once per nodule, as byte-identical files with one box
each. :func:`load_tn5000` merges every group of identical files into one record that carries all of
its boxes, so that a detector is never trained to call a real nodule background, and keeps each
group in one split (see :func:`load_tn5000` for the rule).
"""
import hashlib
import json
import logging
import os
from collections import defaultdict

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from tqdm import tqdm

from ...utils.file_io import atomic_write_json
from ..image_io import image_size
from .voc import BOX_TOLERANCE, read_voc_boxes  # noqa: F401  (BOX_TOLERANCE: coco.py)

__all__ = [
    "CLASS_NAMES",
    "SPLITS",
    "DatasetFormatError",
    "load_tn5000",
    "register_tn5000",
    "tn5000_dirname",
]

logger = logging.getLogger(__name__)

CLASS_NAMES = ("benign", "malignant")
# VOC <name> values -> contiguous class id. TN5000 writes "0"/"1"; the words are accepted too.
VOC_LABELS = {"0": 0, "1": 1, "benign": 0, "malignant": 1}
SPLITS = ("train", "val", "trainval", "test")
# A copy group listed in several split files goes to the most held-out one.
SPLIT_PRIORITY = ("test", "val", "train", "trainval")
_MAX_LISTED_PROBLEMS = 20


class DatasetFormatError(ValueError):
    """An annotation or image of a data set on disk is wrong; the message names every file."""


def tn5000_dirname():
    """``$THYROID_DATASETS/TN5000`` (default ``./datasets/TN5000``), read when called."""
    return os.path.join(os.path.expanduser(os.getenv("THYROID_DATASETS", "datasets")), "TN5000")


def load_tn5000(dirname, split, cache_dir=None):
    """
    Load one TN5000 split as detectron2 dataset dicts, byte-identical copies merged.

    Args:
        dirname (str): the ``TN5000`` folder.
        split (str): "train", "val", "trainval" or "test".
        cache_dir (str or None): where to keep the per-file cache of image hashes and sizes;
            None: ``$THYROID_CACHE`` or ``~/.cache/thyroid_det``. An unwritable cache only
            makes the next load slower.

    Returns:
        list[dict]: one record per distinct image, sorted by VOC id, with ``file_name``,
        ``image_id`` (the int of the lowest VOC id in the group), ``height``, ``width``,
        ``annotations`` ([{bbox, bbox_mode=XYXY_ABS, category_id}], 0 benign, 1 malignant) and
        ``source_ids`` (the VOC ids merged into the record).

    Boxes: VOC counts pixels from 1 and includes both ends, so ``xmin=1, xmax=10`` covers the
    first ten pixels; that is ``[0, 10)`` in detectron2's absolute XYXY, i.e. ``x0 = xmin - 1``,
    ``x1 = xmax`` (as detectron2's own VOC loader does).

    Copies: files whose bytes are identical form one record with the union of their boxes
    (identical boxes kept once). The group belongs to the most held-out split file that lists
    any of its files (test, then val, then train): evaluation sets keep every image they list,
    and no training image is a copy of an evaluation image. "trainval" is the union of the
    train and val records. Groups are found across all split files, so loading one split hashes
    the images of all of them (cached by path, size and mtime).

    Raises:
        FileNotFoundError: the folder or the split file is missing.
        DatasetFormatError: listing every file with a problem. These are errors, not skips,
            because a silently dropped image changes the published split and hides the mistake:
            a listed id without XML or image; unreadable XML or image; a missing or
            non-numeric field; an unknown label; a box with no area; a box further than
            ``BOX_TOLERANCE`` px outside the image; an XML size that differs from the image
            while a box lies outside the real image; copies that label one box differently.

    Logged, not errors: boxes overshooting by at most ``BOX_TOLERANCE`` px (clipped); an XML
    size that differs from the image when every box fits the real image (the image's size is
    used: TN5000's 002589.xml says 818x628 for a 718x500 image); images without boxes (kept, as
    negatives); the number of copies merged.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown TN5000 split {split!r}; expected one of {SPLITS}.")
    if not os.path.isdir(dirname):
        raise FileNotFoundError(
            f"TN5000 not found at {dirname!r}. Set THYROID_DATASETS to the folder that holds "
            "TN5000/ (see datasets/README.md)."
        )
    lists = _read_split_lists(dirname)
    if split == "trainval":
        if not (lists.keys() & {"train", "val", "trainval"}):
            raise FileNotFoundError(
                f"{_split_file(dirname, 'trainval')}: none of train/val/trainval.txt exist."
            )
    elif split not in lists:
        raise FileNotFoundError(f"{_split_file(dirname, split)}: split file not found.")

    owner = {}
    for name in reversed(SPLIT_PRIORITY):
        owner.update({image_id: name for image_id in lists.get(name, ())})
    image_ids = sorted(owner)

    problems = []
    images = _image_facts(dirname, image_ids, cache_dir, problems)
    groups = defaultdict(list)
    for image_id in image_ids:
        if image_id in images:
            groups[images[image_id]["sha1"]].append(image_id)

    wanted = {"trainval": ("train", "val", "trainval")}.get(split, (split,))
    records, num_groups, num_copies, num_straddling = [], 0, 0, 0
    stats = defaultdict(int)
    for members in groups.values():
        split_of_group = min((owner[m] for m in members), key=SPLIT_PRIORITY.index)
        if len(members) > 1:
            num_groups += 1
            num_copies += len(members)
            num_straddling += len({owner[m] for m in members}) > 1
        if split_of_group not in wanted:
            continue
        record = _merge_group(dirname, sorted(members), images, problems, stats)
        if record is not None:
            records.append(record)
    _raise_if_problems(dirname, problems)

    records.sort(key=lambda r: r["source_ids"][0])
    _log_summary(dirname, split, records, num_groups, num_copies, num_straddling, stats)
    return records


def register_tn5000(name, split, dirname=None):
    """
    Register a TN5000 split in detectron2's catalogs; nothing is read until it is used.

    Args:
        name (str): the dataset name, e.g. "tn5000_train".
        split (str): see :func:`load_tn5000`.
        dirname (str or None): the TN5000 folder; None: :func:`tn5000_dirname` at load time.
    """
    DatasetCatalog.register(
        name, lambda: load_tn5000(dirname if dirname is not None else tn5000_dirname(), split)
    )
    MetadataCatalog.get(name).set(
        thing_classes=list(CLASS_NAMES),
        # COCO category ids (as tools/convert_tn5000_to_coco.py writes them) -> contiguous ids,
        # so COCOEvaluator's own conversion of these dicts matches the converter's files.
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(CLASS_NAMES))},
        evaluator_type="coco",
        split=split,
    )


def _split_file(dirname, split):
    return os.path.join(dirname, "ImageSets", "Main", f"{split}.txt")


def _read_split_lists(dirname):
    lists = {}
    for split in SPLITS:
        path = _split_file(dirname, split)
        if os.path.isfile(path):
            with open(path) as f:
                lists[split] = [line.strip() for line in f if line.strip()]
    return lists


def _image_path(dirname, image_id):
    return os.path.join(dirname, "JPEGImages", f"{image_id}.jpg")


def _image_facts(dirname, image_ids, cache_dir, problems):
    """SHA-1 of the bytes and the (EXIF-oriented) size of each image, cached by size and mtime."""
    cache_path = _cache_path(dirname, cache_dir)
    cache = _read_cache(cache_path)
    facts, todo = {}, []
    for image_id in image_ids:
        path = _image_path(dirname, image_id)
        try:
            st = os.stat(path)
        except OSError:
            problems.append((f"JPEGImages/{image_id}.jpg", "image file not found"))
            continue
        key = f"{image_id}.jpg"
        cached = cache.get(key)
        if cached and cached["size"] == st.st_size and cached["mtime_ns"] == st.st_mtime_ns:
            facts[image_id] = cached
        else:
            todo.append((image_id, key, st))

    for image_id, key, st in tqdm(
        todo, desc="Hashing TN5000 images", unit="img", disable=len(todo) < 500
    ):
        path = _image_path(dirname, image_id)
        try:
            with open(path, "rb") as f:
                sha1 = hashlib.sha1(f.read()).hexdigest()
            width, height = image_size(path)
        except Exception as e:  # PIL raises several types for broken files
            problems.append((f"JPEGImages/{image_id}.jpg", f"cannot read image ({e})"))
            continue
        entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha1": sha1}
        entry.update(width=width, height=height)
        facts[image_id] = cache[key] = entry
    if todo:
        _write_cache(cache_path, cache)
    return facts


def _cache_path(dirname, cache_dir):
    if cache_dir is None:
        base = os.getenv("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
        cache_dir = os.getenv("THYROID_CACHE", os.path.join(base, "thyroid_det"))
    key = hashlib.sha1(os.path.abspath(dirname).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"tn5000_images_{key}.json")


def _read_cache(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_cache(path, cache):
    try:
        atomic_write_json(path, cache, indent=None)
    except OSError as e:
        logger.warning(f"Cannot write the image hash cache {path} ({e}); next load re-hashes.")


def _merge_group(dirname, members, images, problems, stats):
    """One record for a group of identical image files; None if an XML has a problem."""
    annotations, origin, ok = [], {}, True
    for image_id in members:
        image, rel = images[image_id], f"Annotations/{image_id}.xml"
        boxes = read_voc_boxes(
            dirname, rel, image["width"], image["height"], VOC_LABELS, problems, stats
        )
        if boxes is None:
            ok = False
            continue
        for category_id, bbox in boxes:
            if bbox in origin:
                other_id, other_category = origin[bbox]
                if other_category != category_id:
                    problems.append(
                        (
                            f"Annotations/{image_id}.xml",
                            f"box {list(bbox)} is {CLASS_NAMES[category_id]} but "
                            f"{CLASS_NAMES[other_category]} in {other_id}.xml, an identical "
                            "copy of the image",
                        )
                    )
                    ok = False
                stats["duplicate_boxes"] += 1
                continue
            origin[bbox] = (image_id, category_id)
            annotations.append(
                {"bbox": list(bbox), "bbox_mode": BoxMode.XYXY_ABS, "category_id": category_id}
            )
    if not ok:
        return None
    first = members[0]
    return {
        "file_name": _image_path(dirname, first),
        "image_id": int(first) if first.isdigit() else first,
        "height": images[first]["height"],
        "width": images[first]["width"],
        "annotations": annotations,
        "source_ids": list(members),
    }


def _raise_if_problems(dirname, problems):
    if not problems:
        return
    lines = [f"  {where}: {what}" for where, what in problems[:_MAX_LISTED_PROBLEMS]]
    if len(problems) > _MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - _MAX_LISTED_PROBLEMS} more")
    raise DatasetFormatError(
        f"TN5000 at {dirname}: {len(problems)} problem(s):\n" + "\n".join(lines)
    )


def _log_summary(dirname, split, records, num_groups, num_copies, num_straddling, stats):
    if num_groups:
        logger.info(
            f"TN5000 at {dirname}: {num_copies} image files are byte-identical copies in "
            f"{num_groups} groups; {num_straddling} groups named by two split files were kept in "
            "the more held-out split."
        )
    if stats["duplicate_boxes"]:
        logger.info(f"TN5000 {split}: dropped {stats['duplicate_boxes']} boxes repeated in copies.")
    if stats["clipped_boxes"]:
        logger.info(f"TN5000 {split}: clipped {stats['clipped_boxes']} boxes to the image.")
    if stats["images_without_boxes"]:
        logger.info(f"TN5000 {split}: {stats['images_without_boxes']} images have no box (kept).")
    counts = [0, 0]
    for record in records:
        for ann in record["annotations"]:
            counts[ann["category_id"]] += 1
    num_files = sum(len(r["source_ids"]) for r in records)
    num_merged = sum(len(r["source_ids"]) > 1 for r in records)
    logger.info(
        f"Loaded TN5000 {split}: {len(records)} images from {num_files} files "
        f"({num_merged} records merge copies), {counts[0]} benign and {counts[1]} malignant "
        "nodules."
    )
