"""Meta-architectures; importing this module registers them in detectron2's META_ARCH_REGISTRY."""
from .mccnn import MCCNN  # noqa: F401
from .ssd import MultiScaleSSD, SSDHead  # noqa: F401
