"""ROI heads registered with detectron2's ROI_HEADS_REGISTRY."""
from .refiner import (  # noqa: F401  (registers)
    RefinerROIHeads,
    SpatialPyramidROIHeads,
    fuse_probabilities,
)
