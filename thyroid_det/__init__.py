"""thyroid_det: MC-CNN thyroid nodule detection and recognition as a detectron2 plugin.

Importing the package registers its datasets, backbone, anchor generator, meta-architectures,
ROI heads and refiner networks with detectron2's registries.
"""
from .config import add_mccnn_config
from . import data, modeling, evaluation  # noqa: F401  (registration side effects)

__all__ = ["add_mccnn_config"]
