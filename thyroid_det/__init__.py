"""thyroid_det: MC-CNN thyroid nodule detection and recognition as a detectron2 plugin.

Importing the package registers its datasets, backbone, anchor generator, meta-architectures,
ROI heads and refiner networks with detectron2's registries.
"""
from . import data, evaluation, modeling  # noqa: F401  (registration side effects)
from .config import add_mccnn_config

__all__ = ["add_mccnn_config"]
