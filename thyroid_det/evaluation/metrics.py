"""Metric functions on plain arrays: the malignant probability of a detection, benign/malignant
rates at a threshold, the Youden threshold, ROC AUC and its bootstrap interval, and FROC points.
sklearn computes what it has (confusion matrix, ROC curve, AUC); the rest is FROC bookkeeping."""

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from .operating_points import percentile_interval

__all__ = [
    "BENIGN",
    "MALIGNANT",
    "FROC_FP_RATES",
    "SIZE_GROUPS",
    "binary_metrics",
    "bootstrap_auc_interval",
    "froc_key",
    "froc_operating_points",
    "malignant_probability",
    "roc_auc",
    "rowwise_roc_auc",
    "sensitivity_at_fp_rates",
    "size_group",
    "youden_threshold",
]

FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
SIZE_GROUPS = ("small", "middle", "large")
BENIGN, MALIGNANT = 0, 1
NAN = float("nan")


def size_group(size, edges):
    """Size group of a nodule: small below ``edges[0]``, large from ``edges[1]``, else middle."""
    if size < edges[0]:
        return SIZE_GROUPS[0]
    return SIZE_GROUPS[1] if size < edges[1] else SIZE_GROUPS[2]


def malignant_probability(instances, malignant_class=MALIGNANT):
    """The model's probability that each detection is malignant.

    ``class_probs[:, malignant_class]`` when the model gives a distribution (thyroid_det models);
    otherwise, for plain detectron2 detectors, the score of a malignant detection and one minus
    the score of a benign one.
    """
    if instances.has("class_probs"):
        return instances.class_probs[:, malignant_class].float()
    scores = instances.scores.float()
    return torch.where(instances.pred_classes == malignant_class, scores, 1.0 - scores)


def _safe_ratio(num, den):
    return float(num) / den if den > 0 else NAN


def binary_metrics(y_true, y_prob, threshold):
    """Accuracy, sensitivity (malignant recall), specificity (benign recall) and the confusion
    matrix (sklearn's) when ``y_prob >= threshold`` is called malignant."""
    y_true = np.asarray(y_true, dtype=bool)
    y_pred = np.asarray(y_prob, dtype=float) >= threshold
    if len(y_true):
        tn, fp, fn, tp = (int(v) for v in confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel())
    else:
        tn = fp = fn = tp = 0
    return {
        "accuracy": _safe_ratio(tp + tn, len(y_true)),
        "sensitivity": _safe_ratio(tp, tp + fn),
        "specificity": _safe_ratio(tn, tn + fp),
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
    }


def youden_threshold(y_true, y_prob):
    """The threshold that maximises sensitivity + specificity - 1 (NaN with one class only).

    Among equally good thresholds the highest is taken. It is chosen on the data it is reported
    on, hence optimistic: fix it on a validation set for a deployed operating point.
    """
    y_true = np.asarray(y_true, dtype=bool)
    if y_true.all() or not y_true.any():
        return NAN
    fpr, tpr, thresholds = roc_curve(y_true, y_prob)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0)) if np.isfinite(thresholds[best]) else 1.0 + 1e-6


def roc_auc(y_true, y_prob):
    """ROC AUC (sklearn), NaN when ``y_true`` lacks either class: the package's AUC (bootstrap
    resamples take :func:`rowwise_roc_auc`, the same number for many at once)."""
    y_true = np.asarray(y_true, dtype=bool)
    if y_true.all() or not y_true.any():
        return NAN
    return float(roc_auc_score(y_true, y_prob))


def bootstrap_auc_interval(y_true, y_prob, num_resamples, seed=0, level=0.95):
    """Percentile bootstrap interval of :func:`roc_auc`, resampling nodules with replacement.

    Resamples that hold a single class are dropped; the interval is NaN when fewer than ten
    resamples remain.
    """
    y_true = np.asarray(y_true, dtype=bool)
    y_prob = np.asarray(y_prob, dtype=float)
    n = len(y_true)
    if n == 0 or num_resamples <= 0:
        return NAN, NAN
    idx = np.random.default_rng(seed).integers(0, n, size=(num_resamples, n))
    return percentile_interval(rowwise_roc_auc(y_true[idx], y_prob[idx]), level)


def rowwise_roc_auc(y_true, y_prob):
    """The ROC AUC of each row of (B, n) labels and probabilities, NaN for a row that lacks a
    class: :func:`roc_auc` of every row, computed for all rows at once as the Mann-Whitney
    statistic (ranks with ties averaged, so a tie counts one half, as in sklearn's AUC).

    For the bootstrap: sklearn checks its inputs on every call, and 1,000 calls per group made
    the AUC interval most of an evaluation's time (about 10 s of each on tn5000_val)."""
    y_true = np.asarray(y_true, dtype=bool)
    ranks = rankdata(np.asarray(y_prob, dtype=float), axis=1)
    num_pos = y_true.sum(axis=1)
    num_neg = y_true.shape[1] - num_pos
    both = (num_pos > 0) & (num_neg > 0)
    u = (ranks * y_true).sum(axis=1) - num_pos * (num_pos + 1) / 2.0
    return np.where(both, u / np.maximum(num_pos * num_neg, 1), NAN)


def froc_operating_points(scores, is_tp, num_gt, num_images):
    """FROC operating points: (false positives per image, sensitivity) at every score threshold,
    from the strictest (nothing kept: (0, 0)) to keeping every detection.

    A threshold falls only between distinct scores, so tied detections enter together.
    """
    scores = np.asarray(scores, dtype=float)
    is_tp = np.asarray(is_tp, dtype=bool)
    if num_gt == 0 or num_images == 0:
        return np.zeros(1), np.full(1, NAN)
    order = np.argsort(-scores, kind="stable")
    scores, is_tp = scores[order], is_tp[order]
    last_of_run = np.r_[scores[1:] != scores[:-1], True] if len(scores) else np.zeros(0, bool)
    tp = np.cumsum(is_tp)[last_of_run]
    fp = np.cumsum(~is_tp)[last_of_run]
    fppi = np.r_[0.0, fp / float(num_images)]
    sensitivity = np.r_[0.0, tp / float(num_gt)]
    return fppi, sensitivity


def sensitivity_at_fp_rates(fppi, sensitivity, rates=FROC_FP_RATES):
    """The best sensitivity reachable with at most each rate of false positives per image."""
    out = []
    for rate in rates:
        ok = fppi <= rate
        out.append(float(np.max(sensitivity[ok])) if ok.any() else NAN)
    return out


def froc_key(rate):
    """Metric name of the FROC sensitivity at ``rate`` false positives per image."""
    return f"froc@{rate:g}fp"
