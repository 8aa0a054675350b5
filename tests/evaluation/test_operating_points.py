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


def test_bootstrap_operating_points_are_sklearns_roc_curve_on_each_resample():
    """The operating points of all resamples at once are those of sklearn's ROC curve on each
    resample (ties kept together, NaN without both classes), so the intervals are the ones the
    resample-by-resample loop gave."""
    from sklearn.metrics import roc_curve

    from thyroid_det.evaluation.operating_points import (
        percentile_interval,
        rowwise_operating_points,
        standard_operating_points,
    )

    def points(t, p):
        fpr, tpr, _ = roc_curve(t, p, drop_intermediate=False)
        spec = 1.0 - fpr
        return spec[np.argmax(tpr >= 0.9 - 1e-12)], tpr[np.flatnonzero(spec >= 0.9 - 1e-12)[-1]]

    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, (300, 40)).astype(bool)
    p = np.round(np.clip(y * 0.25 + rng.normal(0.4, 0.25, (300, 40)), 0, 1), 1)  # ties
    y[3] = False
    spec_at_sens, sens_at_spec = rowwise_operating_points(y, p)
    for i in range(len(y)):
        if i == 3:
            assert np.isnan(spec_at_sens[i]) and np.isnan(sens_at_spec[i])
            continue
        assert (spec_at_sens[i], sens_at_spec[i]) == pytest.approx(points(y[i], p[i]), abs=1e-12)

    y1, p1 = y[0], p[0]
    loop = {"specificity_at_sens90": [], "sensitivity_at_spec90": []}
    draw = np.random.default_rng(7)
    for _ in range(200):
        idx = draw.integers(0, len(y1), len(y1))
        if y1[idx].all() or not y1[idx].any():
            continue
        a, b = points(y1[idx], p1[idx])
        loop["specificity_at_sens90"].append(a)
        loop["sensitivity_at_spec90"].append(b)
    got = standard_operating_points(y1, p1, 200, seed=7)
    for key, values in loop.items():
        low, high = percentile_interval(values)
        interval = (got[f"{key}_ci_low"], got[f"{key}_ci_high"])
        assert interval == pytest.approx((low, high), abs=1e-12)
