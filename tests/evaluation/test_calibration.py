"""ECE, Brier, reliability diagram and temperature scaling of the malignant probability."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from thyroid_det.evaluation.calibration import (
    apply_temperature,
    calibration_metrics,
    expected_calibration_error,
    fit_temperature,
    reliability_curve,
)
from thyroid_det.evaluation.plots import plot_reliability_diagram


def overconfident(n=2000, temperature=3.0, seed=0):
    """Labels drawn from calibrated probabilities, then sharpened by 1/temperature."""
    rng = np.random.default_rng(seed)
    p_true = rng.uniform(0.02, 0.98, n)
    y = rng.random(n) < p_true
    return y.astype(int), apply_temperature(p_true, 1.0 / temperature)


def test_ece_by_hand():
    # bin [0.1, 0.2): p 0.15, 0.15, labels 1, 0 -> |0.5 - 0.15| = 0.35, weight 2/3
    # bin [0.9, 1.0]: p 1.0, label 1 -> 0
    assert expected_calibration_error([1, 0, 1], [0.15, 0.15, 1.0]) == pytest.approx(0.35 * 2 / 3)
    assert np.isnan(expected_calibration_error([], []))


def test_metrics_and_reliability_curve():
    y, p = overconfident()
    metrics = calibration_metrics(y, p)
    assert metrics["ece"] > 0.05 and 0 < metrics["brier"] < 0.5
    predicted, observed, counts = reliability_curve(y, p)
    assert len(predicted) == len(observed) == len(counts) and counts.sum() == len(y)


def test_temperature_recovers_the_sharpening_and_keeps_the_ranking():
    y, p = overconfident(temperature=3.0)
    t = fit_temperature(y, p)
    assert t == pytest.approx(3.0, rel=0.2)
    calibrated = apply_temperature(p, t)
    assert calibration_metrics(y, calibrated)["ece"] < calibration_metrics(y, p)["ece"] / 2
    assert roc_auc_score(y, calibrated) == pytest.approx(roc_auc_score(y, p))
    assert apply_temperature([0.5], t)[0] == pytest.approx(0.5)


def test_temperature_needs_both_classes():
    with pytest.raises(ValueError, match="benign and malignant"):
        fit_temperature([1, 1, 1], [0.2, 0.5, 0.9])


def test_reliability_png(tmp_path):
    y, p = overconfident(n=300)
    before = ("before", *reliability_curve(y, p))
    after = ("after", *reliability_curve(y, apply_temperature(p, fit_temperature(y, p))))
    path = tmp_path / "reliability.png"
    plot_reliability_diagram([before, after], str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
