"""ROI heads registered with detectron2's ROI_HEADS_REGISTRY."""
from .refiner import SpatialPyramidROIHeads, fuse_probabilities  # noqa: F401  (registers)
