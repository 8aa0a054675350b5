"""COCO-format data sets: registration from the config, and writing dataset dicts as COCO JSON."""
import os

from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BoxMode

__all__ = ["register_coco_datasets", "records_to_coco"]


def register_coco_datasets(cfg):
    """
    Register every ``[name, json_file, image_root]`` of ``cfg.DATASETS.COCO_REGISTER``.

    Call it in ``setup()`` after merging the command line, so that any COCO JSON + image folder
    can be trained on without code::

        train_net.py ... DATASETS.COCO_REGISTER "[['mytrain','a.json','imgs']]" \\
            DATASETS.TRAIN "('mytrain',)"

    Uses detectron2's ``register_coco_instances``: its dicts keep ``bbox_mode=XYWH_ABS`` and map
    the sorted COCO category ids to contiguous ids (ids 1, 2 named benign, malignant give 0, 1).
    Names already registered are left alone, so calling it twice is harmless.

    Returns:
        list[str]: the names registered by this call.
    """
    registered = []
    for i, entry in enumerate(cfg.DATASETS.COCO_REGISTER):
        if len(entry) != 3 or not all(isinstance(x, str) for x in entry):
            raise ValueError(
                f"DATASETS.COCO_REGISTER[{i}] is {entry!r}; expected [name, json_file, image_root]."
            )
        name, json_file, image_root = entry
        if name in DatasetCatalog.list():
            continue
        if not os.path.isfile(json_file):
            raise FileNotFoundError(
                f"DATASETS.COCO_REGISTER[{i}] ({name!r}): json file {json_file!r} not found."
            )
        if not os.path.isdir(image_root):
            raise FileNotFoundError(
                f"DATASETS.COCO_REGISTER[{i}] ({name!r}): image folder {image_root!r} not found."
            )
        register_coco_instances(name, {}, json_file, image_root)
        registered.append(name)
    return registered


def records_to_coco(records, thing_classes, image_root=None, description=""):
    """
    Convert detectron2 dataset dicts to a COCO instances dict.

    Category ids are 1..K in ``thing_classes`` order, so detectron2's COCO loader maps them
    back to the same contiguous ids. Image ids are the records' int ``image_id`` when all are
    distinct ints, else 1..N in order.

    Args:
        records (list[dict]): dataset dicts; boxes in any absolute ``BoxMode``.
        thing_classes (list[str]): class names, contiguous id order.
        image_root (str or None): file names are written relative to it; None: as given.
        description (str): written to ``info.description``.
    """
    ids = [r.get("image_id") for r in records]
    if not (all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids)):
        ids = list(range(1, len(records) + 1))
    images, annotations = [], []
    for image_id, record in zip(ids, records):
        file_name = record["file_name"]
        if image_root is not None:
            file_name = os.path.relpath(file_name, image_root)
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "height": record["height"],
                "width": record["width"],
            }
        )
        for ann in record.get("annotations", []):
            x, y, w, h = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYWH_ABS)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": ann["category_id"] + 1,
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": float(w * h),
                    "iscrowd": int(ann.get("iscrowd", 0)),
                }
            )
    return {
        "info": {"description": description},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(thing_classes)],
    }
