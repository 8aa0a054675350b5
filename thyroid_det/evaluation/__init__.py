"""Clinical evaluation: per-nodule detection and benign/malignant metrics beside COCO AP.

metrics.py (metric functions), matching.py (detections to nodules, the per-nodule table),
nodule_evaluator.py (the DatasetEvaluator), report.py (its files), calibration.py and
operating_points.py (probability quality and thresholds), plots.py (ROC, FROC and reliability
figures), image_level.py (sets labelled per image, without boxes), timing.py (model-call timing),
build.py (the evaluators training and the tools run, their flat metrics.json keys and the summary
table the tools print)."""

from .build import (
    FOLD_SUMMARY_KEYS,
    SUMMARY_KEYS,
    PerClassAP50COCOEvaluator,
    build_evaluators,
    flat_metrics,
    format_summary,
    register_class_agnostic,
)
from .metrics import (
    binary_metrics,
    bootstrap_auc_interval,
    malignant_probability,
    roc_auc,
    youden_threshold,
)
from .nodule_evaluator import NoduleEvaluator
from .timing import ModelTimer

__all__ = [
    "FOLD_SUMMARY_KEYS",
    "SUMMARY_KEYS",
    "NoduleEvaluator",
    "PerClassAP50COCOEvaluator",
    "build_evaluators",
    "flat_metrics",
    "format_summary",
    "register_class_agnostic",
    "ModelTimer",
    "binary_metrics",
    "bootstrap_auc_interval",
    "malignant_probability",
    "roc_auc",
    "youden_threshold",
]
