"""Meta-architectures; importing this module registers them in detectron2's META_ARCH_REGISTRY."""
from .mccnn import MCCNN  # noqa: F401
from .ssd import MultiScaleSSD  # noqa: F401
from .ssd_head import SSDHead  # noqa: F401
