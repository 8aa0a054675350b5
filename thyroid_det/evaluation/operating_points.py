"""Operating points of the malignant probability: thresholds chosen for a target (sensitivity
>= 0.95, specificity >= 0.9, Youden) on one set and applied unchanged to another, with bootstrap
95% intervals; and the standard points (sensitivity at 90% specificity and vice versa).

A threshold picked on the set it is reported on is optimistic; fix it on a validation run
(``tools/evaluate.py --threshold-from``) and report the test set at that fixed value."""

import csv
import os
import re

import numpy as np
from sklearn.metrics import roc_curve

__all__ = [
    "fixed_threshold_metrics",
    "labelled_probabilities",
    "parse_target",
    "percentile_interval",
    "rowwise_operating_points",
    "standard_operating_points",
    "threshold_for_target",
]

NAN = float("nan")
ABOVE_ALL = 1.0 + 1e-6  # a threshold no probability reaches: nothing called malignant
TARGET_RE = re.compile(r"^\s*(sensitivity|specificity|sens|spec)\s*>=?\s*([0-9.]+)\s*$")


def parse_target(text):
    """``"sensitivity>=0.95"`` -> ``("sensitivity", 0.95)``; also ``spec>=0.9``, ``youden``.

    Raises:
        ValueError: naming the accepted forms.
    """
    if text.strip().lower() == "youden":
        return "youden", NAN
    match = TARGET_RE.match(text.lower())
    if not match or not 0.0 <= float(match.group(2)) <= 1.0:
        raise ValueError(
            f"bad operating-point target {text!r}: use 'sensitivity>=X', 'specificity>=X' "
            "(X in 0..1) or 'youden'"
        )
    name = {"sens": "sensitivity", "spec": "specificity"}.get(match.group(1), match.group(1))
    return name, float(match.group(2))


def _roc(y_true, y_prob):
    fpr, tpr, thresholds = roc_curve(y_true, y_prob, drop_intermediate=False)
    thresholds = np.where(np.isfinite(thresholds), np.minimum(thresholds, ABOVE_ALL), ABOVE_ALL)
    return fpr, tpr, thresholds


def threshold_for_target(y_true, y_prob, target):
    """The malignant-probability threshold (malignant if prob >= threshold) meeting ``target``:

    * ``("sensitivity", x)``: the highest threshold with sensitivity >= x (best specificity);
    * ``("specificity", x)``: the lowest threshold with specificity >= x (best sensitivity);
    * ``("youden", _)``: the threshold maximising sensitivity + specificity - 1.

    NaN when ``y_true`` lacks either class.
    """
    y_true = np.asarray(y_true, dtype=bool)
    if y_true.all() or not y_true.any():
        return NAN
    if isinstance(target, str):
        target = parse_target(target)
    name, value = target
    fpr, tpr, thresholds = _roc(y_true, y_prob)
    if name == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    if name == "sensitivity":
        return float(thresholds[int(np.argmax(tpr >= value - 1e-12))])
    ok = np.flatnonzero(1.0 - fpr >= value - 1e-12)
    return float(thresholds[ok[-1]])


def _rates(y_true, y_pred):
    """accuracy, sensitivity, specificity along the last axis (NaN where undefined)."""
    tp = np.sum(y_true & y_pred, axis=-1)
    tn = np.sum(~y_true & ~y_pred, axis=-1)
    pos = np.sum(y_true, axis=-1)
    neg = y_true.shape[-1] - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "accuracy": (tp + tn) / float(y_true.shape[-1]),
            "sensitivity": tp / pos,
            "specificity": tn / neg,
        }


def percentile_interval(values, level=0.95):
    """Percentile bootstrap interval of the finite ``values``; NaN when fewer than ten."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 10:
        return NAN, NAN
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def fixed_threshold_metrics(y_true, y_prob, threshold, num_resamples=1000, seed=0):
    """Accuracy, sensitivity and specificity when ``prob >= threshold`` is called malignant, each
    with a 95% percentile bootstrap interval (``<metric>_ci_low`` / ``_ci_high``) over
    ``num_resamples`` resamples of the nodules (or images) with replacement."""
    y_true = np.asarray(y_true, dtype=bool)
    y_pred = np.asarray(y_prob, dtype=float) >= threshold
    out = {k: float(v) for k, v in _rates(y_true, y_pred).items()} if len(y_true) else {
        "accuracy": NAN, "sensitivity": NAN, "specificity": NAN
    }
    boot = {k: np.zeros(0) for k in out}
    if len(y_true) and num_resamples > 0:
        idx = np.random.default_rng(seed).integers(0, len(y_true), (num_resamples, len(y_true)))
        boot = _rates(y_true[idx], y_pred[idx])
    for key in list(out):
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = percentile_interval(boot[key])
    return out


def standard_operating_points(y_true, y_prob, num_resamples=1000, seed=0, level=0.9):
    """``sensitivity_at_spec90`` (the best sensitivity with specificity >= 90%) and
    ``specificity_at_sens90``, their thresholds on this set, and bootstrap 95% intervals (the
    threshold re-picked on each resample). ``level`` 0.9 gives the "90" in the names."""
    y_true = np.asarray(y_true, dtype=bool)
    y_prob = np.asarray(y_prob, dtype=float)
    tag = f"{level * 100:g}"
    keys = {"sensitivity": f"specificity_at_sens{tag}", "specificity": f"sensitivity_at_spec{tag}"}
    out = {}
    if y_true.all() or not y_true.any():
        for key in keys.values():
            out.update({key: NAN, f"{key}_threshold": NAN, f"{key}_ci_low": NAN, f"{key}_ci_high": NAN})
        return out

    def points(t, p):
        fpr, tpr, _ = roc_curve(t, p, drop_intermediate=False)
        spec = 1.0 - fpr
        return {
            keys["sensitivity"]: float(spec[np.argmax(tpr >= level - 1e-12)]),
            keys["specificity"]: float(tpr[np.flatnonzero(spec >= level - 1e-12)[-1]]),
        }

    out.update(points(y_true, y_prob))
    out[f"{keys['sensitivity']}_threshold"] = threshold_for_target(
        y_true, y_prob, ("sensitivity", level)
    )
    out[f"{keys['specificity']}_threshold"] = threshold_for_target(
        y_true, y_prob, ("specificity", level)
    )
    samples = {key: np.zeros(0) for key in keys.values()}
    if num_resamples > 0:
        idx = np.random.default_rng(seed).integers(0, len(y_true), (num_resamples, len(y_true)))
        spec_at_sens, sens_at_spec = rowwise_operating_points(y_true[idx], y_prob[idx], level)
        samples = {keys["sensitivity"]: spec_at_sens, keys["specificity"]: sens_at_spec}
    for key in keys.values():
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = percentile_interval(samples[key])
    return out


def rowwise_operating_points(y_true, y_prob, level=0.9):
    """Per row of (B, n) labels and probabilities, (specificity at sensitivity >= ``level``,
    sensitivity at specificity >= ``level``) on the row's ROC curve (sklearn's ``roc_curve``
    points, ties kept together), NaN for a row that lacks a class. All rows at once, for the
    bootstrap: sklearn's input checks made 1,000 ``roc_curve`` calls about 0.8 s of every
    evaluation."""
    y_true = np.asarray(y_true, dtype=bool)
    y_prob = np.asarray(y_prob, dtype=float)
    order = np.argsort(-y_prob, axis=1, kind="stable")
    probs = np.take_along_axis(y_prob, order, axis=1)
    labels = np.take_along_axis(y_true, order, axis=1)
    tp, fp = np.cumsum(labels, axis=1), np.cumsum(~labels, axis=1)
    num_pos, num_neg = tp[:, -1:], fp[:, -1:]
    both = (num_pos[:, 0] > 0) & (num_neg[:, 0] > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr, spec = tp / num_pos, 1.0 - fp / num_neg
    # a threshold falls only after the last of a run of equal probabilities
    point = np.ones_like(labels)
    point[:, :-1] = probs[:, 1:] != probs[:, :-1]
    rows = np.arange(len(y_true))
    # the curve starts at (0, 0), the strictest threshold, which keeps nothing
    sensitive = point & (tpr >= level - 1e-12)
    first = sensitive.argmax(axis=1)
    spec_at_sens = np.where(level - 1e-12 <= 0, 1.0, spec[rows, first])
    specific = point & (spec >= level - 1e-12)
    last = specific.shape[1] - 1 - specific[:, ::-1].argmax(axis=1)
    sens_at_spec = np.where(specific.any(axis=1), tpr[rows, last], 0.0)
    nan = np.full(len(y_true), NAN)
    return np.where(both, spec_at_sens, nan), np.where(both, sens_at_spec, nan)


def labelled_probabilities(run_dir):
    """``(y_true, malignant_prob, file)`` of the found nodules of a tools/evaluate.py run
    (its ``nodules.csv``) or of the scored images of an image-level run (``images.csv``).

    Raises:
        FileNotFoundError / ValueError: naming the folder or file.
    """
    for name, label_column in (("nodules.csv", "gt_class"), ("images.csv", "label")):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            break
    else:
        raise FileNotFoundError(f"{run_dir}: no nodules.csv or images.csv (not an evaluate.py run)")
    y, p = [], []
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            label = str(row.get(label_column, "")).lower()
            if label in ("benign", "malignant") and row.get("malignant_prob"):
                y.append(label == "malignant")
                p.append(float(row["malignant_prob"]))
    if not y:
        raise ValueError(f"{path}: no found nodule (or image) with a benign/malignant label")
    return np.array(y), np.array(p), path
