#!/usr/bin/env python
"""
Write TN5000 splits, byte-identical copies merged, as COCO instance JSON files.

Categories are ``1 benign`` and ``2 malignant``, so detectron2's COCO loader maps them back to
the contiguous ids 0 and 1 that ``tn5000_*`` use. File names are relative to
``TN5000/JPEGImages``; image ids are the VOC ids (the lowest of a merged group), and each image
lists the VOC ids it merges under ``source_ids``.

With ``--image-dir`` the images are also re-encoded there, grayscale, shrunk to a long side of at
most ``--max-side`` pixels (boxes scaled with them) in ``--format``: a smaller copy of the data
for a machine with little disk or a transfer limit (the README's GPU results trained on one).

Examples:
    python tools/convert_tn5000_to_coco.py --root datasets --splits train val \\
        --output-dir datasets/TN5000_coco
    python tools/convert_tn5000_to_coco.py --splits train --output-dir small \\
        --image-dir small/images --max-side 480 --format webp --quality 75
"""
import argparse
import logging
import os

import cv2
import tqdm
from detectron2.structures import BoxMode
from detectron2.utils.logger import setup_logger

from thyroid_det.data.datasets import CLASS_NAMES, load_tn5000, records_to_coco
from thyroid_det.data.datasets.tn5000 import SPLITS
from thyroid_det.data.image_io import UnreadableImage, read_grayscale
from thyroid_det.utils.cli import check_output_dir, cli_errors
from thyroid_det.utils.file_io import atomic_path, atomic_write_json

logger = logging.getLogger("thyroid_det.convert_tn5000_to_coco")

FORMATS = {"webp": cv2.IMWRITE_WEBP_QUALITY, "jpg": cv2.IMWRITE_JPEG_QUALITY, "png": None}


def reencode(record, image_dir, max_side, fmt, quality):
    """Write ``record``'s image to ``image_dir`` as grayscale ``fmt`` with a long side of at most
    ``max_side``; return the record with file name, size and boxes of the new image."""
    try:
        image = read_grayscale(record["file_name"])
    except UnreadableImage as e:  # a truncated JPEG must not become a clean-looking PNG
        raise UnreadableImage(f"{record['file_name']}: {e}") from None
    height, width = image.shape
    scale = min(1.0, max_side / max(height, width)) if max_side else 1.0
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    sy, sx = image.shape[0] / height, image.shape[1] / width
    stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
    path = os.path.join(image_dir, f"{stem}.{fmt}")
    params = [] if FORMATS[fmt] is None else [FORMATS[fmt], quality]
    ok, encoded = cv2.imencode(f".{fmt}", image, params)
    if not ok:
        raise ValueError(f"{record['file_name']}: OpenCV could not encode it as {fmt}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(encoded.tobytes())
    annotations = []
    for ann in record["annotations"]:
        x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
        box = [x0 * sx, y0 * sy, x1 * sx, y1 * sy]
        annotations.append(dict(ann, bbox=box, bbox_mode=BoxMode.XYXY_ABS))
    return dict(
        record,
        file_name=path,
        height=image.shape[0],
        width=image.shape[1],
        annotations=annotations,
    )


def convert(dirname, split, output_dir, image_dir=None, max_side=0, fmt="webp", quality=75):
    """Write ``output_dir/tn5000_{split}.json`` (and, with ``image_dir``, the re-encoded
    images); returns its path and the number of records."""
    records = load_tn5000(dirname, split)
    image_root = os.path.join(dirname, "JPEGImages")
    if image_dir is not None:
        records = [
            reencode(r, image_dir, max_side, fmt, quality)
            for r in tqdm.tqdm(records, desc=f"re-encoding {split}", unit="image")
        ]
        image_root = image_dir
    coco = records_to_coco(records, CLASS_NAMES, image_root, description=f"TN5000 {split}")
    for image, record in zip(coco["images"], records):
        image["source_ids"] = record["source_ids"]
    path = os.path.join(output_dir, f"tn5000_{split}.json")
    atomic_write_json(path, coco, indent=None)
    logger.info(
        f"Wrote {path}: {len(coco['images'])} images, {len(coco['annotations'])} boxes."
    )
    return path, len(records)


@cli_errors("convert_tn5000_to_coco.py")
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root",
        default=os.getenv("THYROID_DATASETS", "datasets"),
        help="folder holding TN5000/ (default: $THYROID_DATASETS or ./datasets)",
    )
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=SPLITS)
    parser.add_argument("--output-dir", required=True, help="where tn5000_<split>.json go")
    parser.add_argument(
        "--image-dir", help="also write the images here, grayscale, re-encoded (see --format)"
    )
    parser.add_argument(
        "--max-side", type=int, default=0, help="with --image-dir: shrink to this long side"
    )
    parser.add_argument("--format", choices=sorted(FORMATS), default="webp")
    parser.add_argument("--quality", type=int, default=75, help="webp/jpg quality, 1-100")
    args = parser.parse_args(argv)
    if args.image_dir is None and (args.max_side or args.format != "webp"):
        parser.error("--max-side and --format need --image-dir")
    if not 1 <= args.quality <= 100 or args.max_side < 0:
        parser.error("--quality must be in 1..100 and --max-side >= 0")
    setup_logger(name="thyroid_det")

    dirname = os.path.join(os.path.expanduser(args.root), "TN5000")
    if args.image_dir:  # re-encoded as .jpg into JPEGImages/ they would replace the originals
        check_output_dir(args.image_dir, [os.path.join(dirname, "JPEGImages")], "--image-dir")
    entries = []
    for split in args.splits:
        path, _ = convert(
            dirname,
            split,
            args.output_dir,
            args.image_dir,
            args.max_side,
            args.format,
            args.quality,
        )
        image_root = args.image_dir or os.path.join(dirname, "JPEGImages")
        entries.append([f"tn5000_{split}_coco", path, image_root])
    print("Train on them with:\n  DATASETS.COCO_REGISTER " + f'"{entries}"')
    return entries


if __name__ == "__main__":
    main()
