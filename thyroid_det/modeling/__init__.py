"""Models; importing this package registers them with detectron2's registries."""
from . import (  # noqa: F401
    backbone,
    meta_arch,
    roi_heads,  # noqa: F401
)
from .anchor_generator import NodulePriorAnchorGenerator  # noqa: F401
from .refiner_nets import REFINER_REGISTRY, build_refiner  # noqa: F401
