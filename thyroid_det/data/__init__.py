"""Data: registered data sets and the SSD-style dataset mapper."""
from . import datasets  # noqa: F401  (registers the built-in data sets)
from . import dicom  # noqa: F401  (registers the DICOM decoder with image_io)
from .mapper import SSDDatasetMapper  # noqa: F401
