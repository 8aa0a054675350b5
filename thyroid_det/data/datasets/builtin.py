"""Register thyroid_det's built-in data sets with detectron2 (on import; nothing is read)."""
import os

from .phantoms import SYNTHETIC_SETS, register_phantoms
from .tn5000 import register_tn5000, tn5000_dirname


def register_all_tn5000():
    """
    ``tn5000_{train,val,trainval}``, plus ``tn5000_test`` when its split file exists. The root
    (``$THYROID_DATASETS``) is read again when a split is loaded.
    """
    for split in ("train", "val", "trainval"):
        register_tn5000(f"tn5000_{split}", split)
    if os.path.isfile(os.path.join(tn5000_dirname(), "ImageSets", "Main", "test.txt")):
        register_tn5000("tn5000_test", "test")


def register_all_phantoms():
    """``synthetic_train``, ``synthetic_val`` and ``synthetic_tiny``, generated on first use."""
    for name, spec in SYNTHETIC_SETS.items():
        register_phantoms(name, **spec)


register_all_tn5000()
register_all_phantoms()
