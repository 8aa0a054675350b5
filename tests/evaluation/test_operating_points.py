"""Thresholds fixed for a target on one set and applied to another, with bootstrap intervals."""

import numpy as np
import pytest

from thyroid_det.evaluation.operating_points import (
    fixed_threshold_metrics,
    parse_target,
    standard_operating_points,
    threshold_for_target,
)

Y = np.array([0, 0, 0, 0, 1, 0, 1, 1, 1, 1])
P = np.array([0.05, 0.1, 0.2, 0.3, 0.35, 0.4, 0.6, 0.7, 0.8, 0.9])


def test_parse_target():
    assert parse_target("sensitivity>=0.95") == ("sensitivity", 0.95)
    assert parse_target("spec >= 0.9") == ("specificity", 0.9)
    assert parse_target("youden")[0] == "youden"
    with pytest.raises(ValueError, match="sensitivity>=X"):
        parse_target("recall>0.9")


def test_thresholds_meet_their_targets():
    # every malignant nodule called: the highest such threshold is the lowest malignant prob
    assert threshold_for_target(Y, P, "sensitivity>=1.0") == pytest.approx(0.35)
    # 80% sensitivity: 4 of 5 malignant, best specificity -> 0.6
    assert threshold_for_target(Y, P, ("sensitivity", 0.8)) == pytest.approx(0.6)
    # all benign cleared, most sensitive -> 0.6 (the benign 0.4 must fall below)
    assert threshold_for_target(Y, P, "specificity>=1") == pytest.approx(0.6)
    assert np.isnan(threshold_for_target([1, 1], [0.2, 0.3], "youden"))


def test_fixed_threshold_on_another_set_with_intervals():
    threshold = threshold_for_target(Y, P, "sensitivity>=1.0")
    rng = np.random.default_rng(1)
    y_test = rng.random(400) < 0.4
    p_test = np.clip(0.45 * y_test + rng.normal(0.3, 0.15, 400), 0, 1)
    m = fixed_threshold_metrics(y_test, p_test, threshold, num_resamples=300)
    expected = np.mean(p_test[y_test] >= threshold)
    assert m["sensitivity"] == pytest.approx(expected)
    assert m["sensitivity_ci_low"] <= m["sensitivity"] <= m["sensitivity_ci_high"]
    assert m["specificity_ci_high"] - m["specificity_ci_low"] < 0.2


def test_standard_operating_points():
    m = standard_operating_points(Y, P, num_resamples=200)
    # 5 benign: specificity >= 90% means all 5 below the threshold (0.6): 4 of 5 malignant found
    assert m["sensitivity_at_spec90"] == pytest.approx(0.8)
    # 5 malignant: sensitivity >= 90% means all 5 (threshold 0.35): the benign 0.4 is called
    assert m["specificity_at_sens90"] == pytest.approx(0.8)
    assert m["sensitivity_at_spec90_threshold"] == pytest.approx(0.6)
    assert m["sensitivity_at_spec90_ci_low"] <= m["sensitivity_at_spec90_ci_high"]
    one_class = standard_operating_points([1, 1], [0.3, 0.4])
    assert np.isnan(one_class["sensitivity_at_spec90"])
