"""Calibration of the malignancy probability: how far "0.8 malignant" is from 80% of such
nodules being malignant (expected calibration error, Brier score, reliability diagram), and
temperature scaling, the one-parameter fix fitted on a validation set (Guo et al., 2017)."""

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

__all__ = [
    "apply_temperature",
    "calibration_metrics",
    "expected_calibration_error",
    "fit_temperature",
    "reliability_curve",
]

NAN = float("nan")
EPS = 1e-6


def expected_calibration_error(y_true, y_prob, num_bins=10):
    """ECE of the malignant probability: over ``num_bins`` equal-width probability bins, the
    count-weighted mean of |fraction malignant - mean predicted probability|. NaN when empty."""
    y_true = np.asarray(y_true, dtype=float)
    y_prob = np.asarray(y_prob, dtype=float)
    if len(y_true) == 0:
        return NAN
    bins = np.minimum((y_prob * num_bins).astype(np.int64), num_bins - 1)
    counts = np.bincount(bins, minlength=num_bins)
    observed = np.bincount(bins, weights=y_true, minlength=num_bins)
    predicted = np.bincount(bins, weights=y_prob, minlength=num_bins)
    used = counts > 0
    gap = np.abs(observed[used] - predicted[used])  # = count * |mean(y) - mean(p)|
    return float(gap.sum() / len(y_true))


def reliability_curve(y_true, y_prob, num_bins=10):
    """``(mean predicted probability, fraction malignant, count)`` of each non-empty bin
    (sklearn's ``calibration_curve``, uniform bins)."""
    y_true = np.asarray(y_true, dtype=int)
    y_prob = np.clip(np.asarray(y_prob, dtype=float), 0.0, 1.0)
    if len(y_true) == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64)
    observed, predicted = calibration_curve(y_true, y_prob, n_bins=num_bins, strategy="uniform")
    bins = np.minimum((y_prob * num_bins).astype(np.int64), num_bins - 1)
    counts = np.bincount(bins, minlength=num_bins)
    return predicted, observed, counts[counts > 0]


def calibration_metrics(y_true, y_prob, num_bins=10):
    """``{"ece": .., "brier": ..}`` of the malignant probability (NaN with no nodules)."""
    y_true = np.asarray(y_true, dtype=int)
    if len(y_true) == 0:
        return {"ece": NAN, "brier": NAN}
    return {
        "ece": expected_calibration_error(y_true, y_prob, num_bins),
        "brier": float(brier_score_loss(y_true, np.clip(y_prob, 0.0, 1.0), pos_label=1)),
    }


def _logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def apply_temperature(prob, temperature):
    """sigmoid(logit(prob) / temperature): the malignant probability after temperature scaling.
    T > 1 softens an over-confident model, T < 1 sharpens; 0.5 stays 0.5, so the class called
    at 0.5 and every ranking (ROC AUC) are unchanged."""
    if temperature == 1.0:
        return np.asarray(prob, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-_logit(prob) / float(temperature)))


def fit_temperature(y_true, y_prob, bounds=(0.05, 20.0)):
    """The temperature that minimises the negative log-likelihood of ``y_true`` under
    :func:`apply_temperature` (bounded 1-D search over log T).

    Raises:
        ValueError: with fewer than two nodules or a single class, where no temperature is
            identifiable.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    if len(y_true) < 2 or len(np.unique(y_true)) < 2:
        raise ValueError(
            f"temperature scaling needs benign and malignant found nodules; got {len(y_true)} "
            f"nodule(s), {int(y_true.sum())} malignant"
        )
    z = _logit(y_prob)

    def nll(log_t):
        s = z / np.exp(log_t)
        # -[y log sigmoid(s) + (1 - y) log(1 - sigmoid(s))], stably
        return float(np.mean(np.logaddexp(0.0, s) - y_true * s))

    result = minimize_scalar(nll, bounds=np.log(bounds), method="bounded")
    return float(np.exp(result.x))
