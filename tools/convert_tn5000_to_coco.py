#!/usr/bin/env python
"""
Write TN5000 splits, byte-identical copies merged, as COCO instance JSON files.

Categories are ``1 benign`` and ``2 malignant``, so detectron2's COCO loader maps them back to
the contiguous ids 0 and 1 that ``tn5000_*`` use. File names are relative to
``TN5000/JPEGImages``; image ids are the VOC ids (the lowest of a merged group), and each image
lists the VOC ids it merges under ``source_ids``.

Example:
    python tools/convert_tn5000_to_coco.py --root datasets --splits train val \\
        --output-dir datasets/TN5000_coco
"""
import argparse
import logging
import os

from detectron2.utils.logger import setup_logger

from thyroid_det.data.datasets import CLASS_NAMES, load_tn5000, records_to_coco
from thyroid_det.data.datasets.tn5000 import SPLITS
from thyroid_det.utils.file_io import atomic_write_json

logger = logging.getLogger("thyroid_det.convert_tn5000_to_coco")


def convert(dirname, split, output_dir):
    """Write ``output_dir/tn5000_{split}.json``; returns its path and the number of records."""
    records = load_tn5000(dirname, split)
    image_root = os.path.join(dirname, "JPEGImages")
    coco = records_to_coco(records, CLASS_NAMES, image_root, description=f"TN5000 {split}")
    for image, record in zip(coco["images"], records):
        image["source_ids"] = record["source_ids"]
    path = os.path.join(output_dir, f"tn5000_{split}.json")
    atomic_write_json(path, coco, indent=None)
    logger.info(
        f"Wrote {path}: {len(coco['images'])} images, {len(coco['annotations'])} boxes."
    )
    return path, len(records)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root",
        default=os.getenv("THYROID_DATASETS", "datasets"),
        help="folder holding TN5000/ (default: $THYROID_DATASETS or ./datasets)",
    )
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=SPLITS)
    parser.add_argument("--output-dir", required=True, help="where tn5000_<split>.json go")
    args = parser.parse_args(argv)
    setup_logger(name="thyroid_det")

    dirname = os.path.join(os.path.expanduser(args.root), "TN5000")
    entries = []
    for split in args.splits:
        path, _ = convert(dirname, split, args.output_dir)
        entries.append([f"tn5000_{split}_coco", path, os.path.join(dirname, "JPEGImages")])
    print("Train on them with:\n  DATASETS.COCO_REGISTER " + f'"{entries}"')
    return entries


if __name__ == "__main__":
    main()
