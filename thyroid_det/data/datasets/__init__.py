"""Data sets: TN5000 (VOC), any COCO JSON, synthetic phantoms, and k-fold splits."""
from . import builtin  # noqa: F401  (registers tn5000_* and synthetic_*)
from .coco import load_coco, records_to_coco, register_coco, register_coco_datasets
from .kfold import kfold_assign, kfold_splits, register_kfold_datasets
from .phantoms import (
    generate_phantoms,
    load_phantoms,
    register_phantoms,
    render_phantom,
)
from .tn5000 import CLASS_NAMES, DatasetFormatError, load_tn5000, register_tn5000

__all__ = [
    "CLASS_NAMES",
    "DatasetFormatError",
    "generate_phantoms",
    "kfold_assign",
    "kfold_splits",
    "load_coco",
    "load_phantoms",
    "load_tn5000",
    "records_to_coco",
    "register_coco",
    "register_coco_datasets",
    "register_kfold_datasets",
    "register_phantoms",
    "register_tn5000",
    "render_phantom",
]
