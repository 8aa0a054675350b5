#!/usr/bin/env python
"""
Split a data set into K stratified folds and write each fold's train/val as COCO JSON.

Each image (TN5000: each merged record, so copies and all boxes of an image stay together) is
one unit; folds are stratified by whether the image holds a malignant nodule and depend only on
the set of images, K and the seed. Writes ``fold{i}_train.json``, ``fold{i}_val.json`` and
``folds.json`` (the image ids of each fold) to the output folder.

Examples:
    python tools/kfold_split.py --dataset tn5000_trainval --k 5 --output-dir datasets/tn5000_folds
    python tools/kfold_split.py --coco-json a.json --image-root imgs --output-dir folds
"""
import argparse
import hashlib
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger

import thyroid_det  # noqa: F401  (registers tn5000_* and synthetic_*)
from thyroid_det.data.datasets import (
    CLASS_NAMES,
    kfold_assign,
    records_to_coco,
    register_coco,
)
from thyroid_det.utils.cli import check_dataset, cli_errors
from thyroid_det.utils.file_io import atomic_write_json


def _load(args):
    """The records, class names and image root of --dataset or --coco-json, loaded as training
    loads them (a COCO file through thyroid_det's checked loader, load_coco)."""
    if args.coco_json:
        key = hashlib.sha1(os.path.abspath(args.coco_json).encode()).hexdigest()[:8]
        name = f"kfold_input_{key}"
        if name not in DatasetCatalog.list():
            register_coco(name, args.coco_json, args.image_root)
        records = check_dataset(name, need_images=False)  # a split needs the annotations alone
        return records, MetadataCatalog.get(name).thing_classes, args.image_root
    records = check_dataset(args.dataset, need_images=False)
    classes = MetadataCatalog.get(args.dataset).get("thing_classes", list(CLASS_NAMES))
    root = args.image_root or os.path.commonpath(
        [os.path.dirname(os.path.abspath(r["file_name"])) for r in records]
    )
    return records, classes, root


@cli_errors("kfold_split.py")
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dataset", default="tn5000_trainval", help="a registered data set")
    source.add_argument("--coco-json", help="a COCO instances file (needs --image-root)")
    parser.add_argument("--image-root", help="image folder; file names are written relative to it")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--positive-class", default="malignant", help="class that defines the strata"
    )
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    if args.coco_json and not args.image_root:
        parser.error("--coco-json needs --image-root")
    setup_logger(name="thyroid_det")

    records, classes, image_root = _load(args)
    if args.positive_class not in classes:
        parser.error(f"--positive-class {args.positive_class!r} is not one of {classes}")
    folds = kfold_assign(records, args.k, args.seed, classes.index(args.positive_class))
    source_name = args.coco_json or args.dataset
    summary = {"source": source_name, "k": args.k, "seed": args.seed, "folds": []}
    entries = []
    for i in range(args.k):
        parts = {}
        for part, members in (
            ("train", [r for r, f in zip(records, folds) if f != i]),
            ("val", [r for r, f in zip(records, folds) if f == i]),
        ):
            coco = records_to_coco(
                members, classes, image_root, description=f"{source_name} fold {i} {part}"
            )
            path = os.path.join(args.output_dir, f"fold{i}_{part}.json")
            atomic_write_json(path, coco, indent=None)
            parts[part] = [im["id"] for im in coco["images"]]
            entries.append([f"fold{i}_{part}", os.path.abspath(path), os.path.abspath(image_root)])
        positives = sum(
            any(a["category_id"] == classes.index(args.positive_class) for a in r["annotations"])
            for r, f in zip(records, folds)
            if f == i
        )
        summary["folds"].append({**parts, "val_images_with_positive": positives})
        print(f"fold {i}: {len(parts['train'])} train / {len(parts['val'])} val images "
              f"({positives} val images hold a {args.positive_class} box)")
    atomic_write_json(os.path.join(args.output_dir, "folds.json"), summary, indent=None)
    print(f"Wrote {args.output_dir}. Fold 0, for example:\n  DATASETS.COCO_REGISTER "
          f'"{entries[:2]}" DATASETS.TRAIN "(\'fold0_train\',)" DATASETS.TEST "(\'fold0_val\',)"')
    return summary


if __name__ == "__main__":
    main()
