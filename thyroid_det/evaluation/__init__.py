"""Clinical evaluation: per-nodule detection and benign/malignant metrics beside COCO AP."""

from .build import (
    PerClassAP50COCOEvaluator,
    build_evaluators,
    flat_metrics,
    register_class_agnostic,
)
from .nodule_evaluator import NoduleEvaluator
from .timing import ModelTimer

__all__ = [
    "NoduleEvaluator",
    "PerClassAP50COCOEvaluator",
    "build_evaluators",
    "flat_metrics",
    "register_class_agnostic",
    "ModelTimer",
]
