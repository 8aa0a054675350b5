"""Register thyroid_det's built-in data sets with detectron2 (on import; nothing is read)."""
from .phantoms import SYNTHETIC_SETS, register_phantoms
from .tn5000 import SPLITS, register_tn5000


def register_all_tn5000():
    """
    ``tn5000_{train,val,trainval,test}``. The root (``$THYROID_DATASETS``) is read when a split
    is loaded, so it may be set after import; ``tn5000_test`` then needs its split file
    (``ImageSets/Main/test.txt``, which the release lacks) and names it when it is missing.
    """
    for split in SPLITS:
        register_tn5000(f"tn5000_{split}", split)


def register_all_phantoms():
    """``synthetic_train``, ``synthetic_val`` and ``synthetic_tiny``, generated on first use."""
    for name, spec in SYNTHETIC_SETS.items():
        register_phantoms(name, **spec)


register_all_tn5000()
register_all_phantoms()
