"""COCO-format data sets: checked loading and registration, and writing dataset dicts as COCO."""
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode

from ..dicom import add_dicom_fields
from ..image_io import image_size
from .tn5000 import BOX_TOLERANCE, DatasetFormatError

__all__ = ["load_coco", "register_coco", "register_coco_datasets", "records_to_coco"]

logger = logging.getLogger(__name__)


def load_coco(json_file, image_root, dataset_name=None):
    """
    detectron2's ``load_coco_json`` with the TN5000 loader's rules, for every COCO route:

    * a file that is not COCO instances JSON raises DatasetFormatError naming it;
    * boxes with zero or negative width or height (never matchable: they only lower recall)
      are dropped, with one logged count;
    * an image whose real size differs from its ``width``/``height`` gets one warning naming the
      file, and the real size is used; if a box then lies outside the real image, the JSON does
      not describe that image: DatasetFormatError;
    * an image file that exists but cannot be read raises DatasetFormatError naming it.

    Images that are missing are left to the reader (and the tools' check_dataset). DICOM images
    get their calibration and frame (an image entry's optional ``"frame"``, 0-based):
    :func:`~thyroid_det.data.dicom.add_dicom_fields`.
    """
    try:
        records = load_coco_json(json_file, image_root, dataset_name)
    except Exception as e:  # json, pycocotools and detectron2 raise many types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DatasetFormatError(
            f"{json_file}: not a usable COCO instances file ({type(e).__name__}: {reason})"
        ) from None
    dropped = []
    for record in records:
        kept = []
        for ann in record.get("annotations", []):
            x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
            (kept if x1 > x0 and y1 > y0 else dropped).append(ann)
        record["annotations"] = kept
        _use_real_size(record, json_file)
    if dropped:
        logger.warning(
            f"{json_file}: dropped {len(dropped)} boxes with zero or negative width or height "
            f"(first: {list(dropped[0]['bbox'])})"
        )
    return add_dicom_fields(records, json_file)


def _use_real_size(record, json_file):
    if not os.path.isfile(record["file_name"]):
        return
    try:
        width, height = image_size(record["file_name"])
    except OSError as e:  # UnreadableImage, DicomError: the message says why, not which file
        raise DatasetFormatError(f"{json_file}: image {record['file_name']}: {e}") from None
    if (width, height) == (record["width"], record["height"]):
        return
    for ann in record["annotations"]:
        x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
        tol = BOX_TOLERANCE
        if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
            raise DatasetFormatError(
                f"{json_file}: {record['file_name']} is {width}x{height}, not "
                f"{record['width']}x{record['height']} as the JSON says, and box "
                f"{list(ann['bbox'])} does not fit the image"
            )
    logger.warning(
        f"{json_file}: {record['file_name']} is {width}x{height}, not "
        f"{record['width']}x{record['height']} as the JSON says; all boxes fit, using its size"
    )
    record["width"], record["height"] = width, height


def register_coco(name, json_file, image_root):
    """Register a COCO file loaded by :func:`load_coco`. ``json_file`` is not set in the
    metadata, so COCOEvaluator scores against the checked records rather than the raw file."""
    DatasetCatalog.register(name, lambda: load_coco(json_file, image_root, name))
    MetadataCatalog.get(name).set(
        coco_json=json_file, image_root=image_root, evaluator_type="coco"
    )


def register_coco_datasets(cfg):
    """
    Register every ``[name, json_file, image_root]`` of ``cfg.DATASETS.COCO_REGISTER``.

    Call it in ``setup()`` after merging the command line, so that any COCO JSON + image folder
    can be trained on without code::

        train_net.py ... DATASETS.COCO_REGISTER "[['mytrain','a.json','imgs']]" \\
            DATASETS.TRAIN "('mytrain',)"

    Loads with :func:`load_coco` (detectron2's ``load_coco_json``, checked): its dicts keep
    ``bbox_mode=XYWH_ABS`` and map the sorted COCO category ids to contiguous ids (ids 1, 2 named
    benign, malignant give 0, 1).
    Names already registered are left alone, so calling it twice is harmless.

    Returns:
        list[str]: the names registered by this call.

    Raises:
        ConfigError: an entry that is not ``[name, json_file, image_root]``.
        FileNotFoundError: an entry's JSON file or image folder does not exist.
    """
    from ...engine.defaults import ConfigError  # engine.defaults imports this module

    registered = []
    for i, entry in enumerate(cfg.DATASETS.COCO_REGISTER):
        if not (
            isinstance(entry, (list, tuple))
            and len(entry) == 3
            and all(isinstance(x, str) for x in entry)
        ):
            raise ConfigError(
                f"DATASETS.COCO_REGISTER[{i}] is {entry!r}; expected [name, json_file, image_root]"
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
        register_coco(name, json_file, image_root)
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
