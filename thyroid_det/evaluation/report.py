"""What NoduleEvaluator writes: the metric definitions and report (nodule_metrics.json), the
per-nodule table (nodules.csv), the log table, and the ROC, reliability and FROC plots."""

import csv
import io
import math
import os

from tabulate import tabulate

from ..utils.file_io import atomic_write_json, atomic_write_text
from .metrics import FROC_FP_RATES, SIZE_GROUPS
from .plots import plot_froc_curves, plot_reliability_diagram, plot_roc_curves

__all__ = ["DEFINITIONS", "format_nodule_table", "nodule_csv", "write_nodule_report"]

NAN = float("nan")
# What each metric means; written into nodule_metrics.json.
DEFINITIONS = {
    "recall50": "fraction of nodules with a detection at IoU >= 0.5 (any score the model keeps)",
    "num_missed": "nodules with no detection at IoU >= {iou:g}",
    "classification": "over found nodules: the best-scoring detection at IoU >= {iou:g} gives "
    "the malignant probability; malignant is the positive class (sensitivity), benign the "
    "negative (specificity)",
    "threshold_0.5": "accuracy, sensitivity, specificity, cm_*: malignant if probability >= 0.5",
    "youden": "*_youden: malignant if probability >= youden_threshold, the threshold maximising "
    "sensitivity + specificity - 1 over all found nodules of this set (optimistic: fix it on a "
    "validation set)",
    "auc": "ROC AUC (sklearn); 95% percentile bootstrap interval, {bootstrap} resamples of found "
    "nodules, seed {seed}",
    "froc": "detection sensitivity at <r> false positives per image: class-agnostic; in score "
    "order a detection hits an unmatched nodule at IoU >= 0.5 or is a false positive",
    "calibration": "ece: expected calibration error of the malignant probability over found "
    "nodules, {bins} equal-width bins, |fraction malignant - mean probability| weighted by bin "
    "count; brier: mean squared error of the probability (sklearn brier_score_loss)",
    "operating_points": "sensitivity_at_spec90: best sensitivity with specificity >= 0.9 "
    "(specificity_at_sens90 vice versa), threshold picked on this set, 95% bootstrap interval "
    "re-picking it per resample; *_fixed: malignant if probability >= fixed_threshold, a "
    "threshold fixed beforehand (TEST.NODULE_EVAL.FIXED_THRESHOLD), with 95% bootstrap intervals",
    "groups": "<metric>-size_<group>, <metric>-<field>_<value>; size groups count false "
    "positives over all images, metadata groups over the group's images; *_youden use the "
    "overall youden_threshold",
}


def _num(value, fmt):
    return "" if value is None or math.isnan(value) else format(value, fmt)


def nodule_csv(nodules, group_by=(), stages=()):
    """One row per ground-truth nodule (a row of the matching table): where it is, its class and
    size, and what the model said; ``stages`` adds the cascade's per-stage probabilities."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        ["image_id", "file_name", "gt_x0", "gt_y0", "gt_x1", "gt_y1", "gt_class"]
        + ["size_px", "size_mm", "size_group"]
        + list(group_by)
        + ["detected", "iou", "score", "malignant_prob", "prediction"]
        + [f"{s}_prob" for s in stages]
    )
    for n in nodules:
        writer.writerow(
            [n["image_id"], n["file_name"], *[f"{v:.1f}" for v in n["box"]], n["category"]]
            + [f"{n['size']:.1f}", _num(n["size_mm"], ".1f"), n["size_group"]]
            + ["" if n[f"group:{f}"] is None else n[f"group:{f}"] for f in group_by]
            + [int(n["detected"]), f"{n['iou']:.3f}", _num(n["score"], ".4f")]
            + [_num(n["malignant_prob"], ".4f"), n["prediction"]]
            + [_num(n[f"{s}_prob"], ".4f") for s in stages]
        )
    return buf.getvalue()


def _group_order(name):
    if name.startswith("size_") and name[5:] in SIZE_GROUPS:
        return (0, SIZE_GROUPS.index(name[5:]), name)
    return (1, 0, name)


def format_nodule_table(metrics):
    """A text table of the main nodule metrics, one row for all nodules and one per group."""
    groups = [""] + sorted({k.split("-", 1)[1] for k in metrics if "-" in k}, key=_group_order)
    columns = ["num_nodules", "recall50", "froc_cpm", "accuracy", "sensitivity", "specificity"]
    columns.append("auc")
    rows = []
    for group in groups:
        suffix = f"-{group}" if group else ""
        row = [group or "all"]
        for c in columns:
            value = metrics.get(c + suffix, NAN)
            count = c == "num_nodules" and not math.isnan(value)
            row.append(f"{value:.0f}" if count else f"{value:.3f}")
        low = metrics.get("auc_ci_low" + suffix, NAN)
        high = metrics.get("auc_ci_high" + suffix, NAN)
        row.append(f"[{low:.3f}, {high:.3f}]")
        rows.append(row)
    return tabulate(rows, headers=["group"] + columns + ["auc 95% CI"], tablefmt="pipe")


def write_nodule_report(report, output_dir, dataset_name, group_by=()):
    """nodule_metrics.json, nodules.csv, roc.png (with a diagnosis), reliability.png (with
    calibration) and froc.png, from :meth:`NoduleEvaluator.compute`'s report."""
    curves = report["curves"]
    details = dict(report["details"])
    details["metrics"] = report["metrics"]
    details["froc_curve"] = {
        "fppi": curves["all"]["froc"][0],
        "sensitivity": curves["all"]["froc"][1],
    }
    details["notes"] = report["notes"]
    atomic_write_json(os.path.join(output_dir, "nodule_metrics.json"), details)
    atomic_write_text(
        os.path.join(output_dir, "nodules.csv"),
        nodule_csv(report["nodules"], group_by, report["stages"]),
    )
    if "roc" in curves["all"]:
        roc = [("all", *curves["all"]["roc"])]
        roc += [
            (name, *c["roc"])
            for name, c in curves.items()
            if name.startswith("size_") and len(c["roc"][0])
        ]
        plot_roc_curves(
            roc,
            os.path.join(output_dir, "roc.png"),
            title=f"ROC, malignant vs benign: {dataset_name}",
        )
    if "reliability" in curves["all"]:
        m = report["metrics"]
        plot_reliability_diagram(
            [(f"all (ECE {m['ece']:.3f}, Brier {m['brier']:.3f})", *curves["all"]["reliability"])],
            os.path.join(output_dir, "reliability.png"),
            title=f"Reliability of the malignant probability: {dataset_name}",
        )
    froc = [
        (name, *c["froc"])
        for name, c in curves.items()
        if name == "all" or name.startswith("size_")
    ]
    plot_froc_curves(
        froc, os.path.join(output_dir, "froc.png"), FROC_FP_RATES, title=f"FROC: {dataset_name}"
    )
