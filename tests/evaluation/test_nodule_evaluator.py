"""NoduleEvaluator on hand-made ground truth and predictions whose metrics are known."""

import csv
import itertools
import json
import logging
import math

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances
from sklearn.metrics import roc_auc_score

from thyroid_det.evaluation import NoduleEvaluator, build_evaluators
from thyroid_det.evaluation.metrics import (
    bootstrap_auc_interval,
    froc_operating_points,
    roc_auc,
    sensitivity_at_fp_rates,
    youden_threshold,
)

from ..conftest import make_cfg

_names = itertools.count()


def register(records, classes=("benign", "malignant")):
    name = f"nodule_eval_test_{next(_names)}"
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=list(classes))
    return name


def record(image_id, boxes, classes, **extra):
    return {
        "file_name": f"/nowhere/{image_id}.png",
        "image_id": image_id,
        "height": 400,
        "width": 400,
        "annotations": [
            {"bbox": list(b), "bbox_mode": BoxMode.XYXY_ABS, "category_id": c}
            for b, c in zip(boxes, classes)
        ],
        **extra,
    }


def output(boxes, scores, malignant_probs=None, classes=None, coarse=None, fine=None):
    inst = Instances((400, 400))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    if malignant_probs is not None:
        p = torch.tensor(malignant_probs, dtype=torch.float32)
        inst.class_probs = torch.stack([1 - p, p], dim=1)
        inst.pred_classes = (p >= 0.5).long()
    else:
        inst.pred_classes = torch.tensor(classes, dtype=torch.int64)
    for field, probs in (("coarse_probs", coarse), ("fine_probs", fine)):
        if probs is not None:
            p = torch.tensor(probs, dtype=torch.float32)
            inst.set(field, torch.stack([1 - p, p], dim=1))
    return {"instances": inst}


def run(records, outputs, classes=("benign", "malignant"), **kwargs):
    name = register(records, classes)
    kwargs.setdefault("bootstrap", 200)
    evaluator = NoduleEvaluator(name, distributed=False, **kwargs)
    evaluator.reset()
    for rec, out in zip(records, outputs):
        evaluator.process([{"image_id": rec["image_id"], "file_name": rec["file_name"]}], [out])
    return evaluator.evaluate()["nodule"]


BOX = [100, 100, 200, 200]
NEAR = [105, 100, 205, 200]  # IoU 0.905 with BOX
FAR = [300, 300, 350, 350]


def four_images(probs):
    labels = [1, 0, 1, 0]
    records = [record(i, [BOX], [c]) for i, c in enumerate(labels)]
    outputs = [output([BOX], [0.9], [p]) for p in probs]
    return records, outputs


def test_perfect_model():
    m = run(*four_images([0.9, 0.1, 0.8, 0.2]))
    assert m["num_images"] == 4 and m["num_nodules"] == 4
    assert m["recall50"] == 1.0 and m["num_missed"] == 0
    for key in ("accuracy", "sensitivity", "specificity", "auc", "accuracy_youden"):
        assert m[key] == 1.0, key
    assert (m["cm_tp"], m["cm_tn"], m["cm_fp"], m["cm_fn"]) == (2, 2, 0, 0)
    assert m["froc@0.125fp"] == 1.0 and m["froc_cpm"] == 1.0


def test_inverted_model():
    m = run(*four_images([0.1, 0.9, 0.2, 0.8]))
    assert m["accuracy"] == 0.0 and m["sensitivity"] == 0.0 and m["specificity"] == 0.0
    assert m["auc"] == 0.0
    assert m["recall50"] == 1.0


def test_missed_nodule_is_counted_and_left_out_of_classification():
    records, outputs = four_images([0.9, 0.1, 0.8, 0.2])
    outputs[0] = output([FAR], [0.3], [0.9])
    m = run(records, outputs)
    assert m["recall50"] == 0.75 and m["num_missed"] == 1 and m["num_detected"] == 3
    assert m["num_malignant"] + m["num_benign"] == 3
    assert m["accuracy"] == 1.0
    # The far detection is a (low-scoring) false positive; the missed nodule caps sensitivity.
    assert m["froc@0.125fp"] == 0.75 and m["froc@8fp"] == 0.75


def test_image_without_nodules_counts_its_false_positives():
    records = [record(0, [BOX], [1]), record(1, [], [])]
    outputs = [output([BOX], [0.5], [0.9]), output([BOX], [0.9], [0.9])]
    m = run(records, outputs)
    assert m["num_images"] == 2 and m["num_nodules"] == 1
    # The false positive outscores the true one: sensitivity 1 needs 1 FP over 2 images.
    assert m["froc@0.25fp"] == 0.0 and m["froc@0.5fp"] == 1.0
    assert math.isnan(m["auc"])  # one class only


def test_ties_in_scores():
    # Two detections with the same score on one nodule: the one with the higher IoU is matched.
    records = [record(0, [BOX], [1])]
    outputs = [output([[140, 100, 240, 200], NEAR], [0.7, 0.7], [0.1, 0.9])]
    m = run(records, outputs)
    assert m["sensitivity"] == 1.0
    # Equal probabilities for every nodule: AUC is exactly chance.
    m = run(*four_images([0.5, 0.5, 0.5, 0.5]))
    assert m["auc"] == 0.5
    assert m["sensitivity"] == 1.0 and m["specificity"] == 0.0  # 0.5 counts as malignant


def test_plain_detectron2_outputs_derive_the_malignant_probability():
    records = [record(0, [BOX], [1]), record(1, [BOX], [0])]
    # Malignant at 0.8 -> p = 0.8; benign at 0.7 -> p = 0.3.
    outputs = [output([BOX], [0.8], classes=[1]), output([BOX], [0.7], classes=[0])]
    m = run(records, outputs)
    assert m["accuracy"] == 1.0 and m["auc"] == 1.0


def test_froc_hand_case():
    # 2 images, 3 nodules. By score: TP(a) 0.9, FP 0.8, TP(b) 0.7, duplicate of a 0.6 (FP), FP 0.5.
    records = [record(0, [BOX, FAR], [1, 0]), record(1, [BOX], [1])]
    outputs = [
        output([BOX, [0, 0, 40, 40], NEAR, [0, 300, 60, 360]], [0.9, 0.8, 0.6, 0.5], [0.9] * 4),
        output([BOX], [0.7], [0.9]),
    ]
    m = run(records, outputs)
    # Points (fppi, sens): (0, 0), (0, 1/3), (0.5, 1/3), (0.5, 2/3), (1, 2/3), (1.5, 2/3).
    assert m["froc@0.125fp"] == pytest.approx(1 / 3)
    assert m["froc@0.5fp"] == pytest.approx(2 / 3)
    assert m["froc@8fp"] == pytest.approx(2 / 3)
    assert m["recall50"] == pytest.approx(2 / 3)
    fppi, sens = froc_operating_points([0.9, 0.8, 0.7], [True, False, True], num_gt=2, num_images=1)
    np.testing.assert_allclose(fppi, [0, 0, 1, 1])
    np.testing.assert_allclose(sens, [0, 0.5, 0.5, 1.0])
    # Tied scores enter together: no operating point between them.
    fppi, sens = froc_operating_points([0.5, 0.5], [True, False], num_gt=1, num_images=1)
    assert sensitivity_at_fp_rates(fppi, sens, [0.5, 1.0]) == [0.0, 1.0]


def test_cascade_stages_are_scored_alone():
    records, _ = four_images([])
    probs = [(0.9, 0.2, 0.8), (0.1, 0.7, 0.3), (0.8, 0.4, 0.9), (0.2, 0.9, 0.1)]
    outputs = [output([BOX], [0.9], [p], coarse=[c], fine=[f]) for p, c, f in probs]
    m = run(records, outputs)
    assert m["auc"] == 1.0 and m["auc_coarse"] == 0.0 and m["auc_fine"] == 1.0
    assert m["accuracy_coarse"] == 0.0 and m["sensitivity_fine"] == 1.0
    m = run(*four_images([0.9, 0.1, 0.8, 0.2]))
    assert "auc_coarse" not in m


def test_size_groups():
    small, middle, large = [0, 0, 50, 50], [0, 0, 100, 100], [0, 0, 200, 200]
    records = [record(0, [small], [1]), record(1, [middle], [0]), record(2, [large], [1])]
    outputs = [
        output([small], [0.9], [0.9]),
        output([FAR], [0.9], [0.9]),
        output([large], [0.9], [0.2]),
    ]
    m = run(records, outputs, size_edges=(89, 139))
    assert m["num_nodules-size_small"] == 1 and m["recall50-size_small"] == 1
    assert m["num_nodules-size_middle"] == 1 and m["recall50-size_middle"] == 0
    assert m["accuracy-size_large"] == 0 and m["accuracy-size_small"] == 1
    assert math.isnan(m["accuracy-size_middle"])


def calibrated(mm_per_px):
    """A record's DICOM calibration, in the form thyroid_det's DICOM loading gives it."""
    region = {"x0": 0, "y0": 0, "x1": 399, "y1": 399, "mm_per_px_x": mm_per_px, "mm_per_px_y": mm_per_px}
    return {"source": "SequenceOfUltrasoundRegions", "regions": [region]}


def test_size_groups_in_millimetres_when_every_image_is_calibrated(tmp_path):
    box = [0, 0, 100, 100]  # 100 px: the middle pixel group
    records = [
        record(0, [box], [1], calibration=calibrated(0.05)),  # 5 mm: small
        record(1, [box], [0], calibration=calibrated(0.15)),  # 15 mm: middle
        record(2, [box], [1], calibration=calibrated(0.3)),  # 30 mm: large
    ]
    outputs = [output([box], [0.9], [0.9]) for _ in records]
    m = run(records, outputs, output_dir=str(tmp_path))
    assert [m[f"num_nodules-size_{g}"] for g in ("small", "middle", "large")] == [1, 1, 1]
    report = json.loads((tmp_path / "nodule_metrics.json").read_text())
    assert "millimetres" in report["size_groups"] and "10 mm" in report["size_groups"]
    assert report["size_group_counts"] == {"small": 1, "middle": 1, "large": 1}
    rows = list(csv.DictReader(open(tmp_path / "nodules.csv")))
    assert [r["size_mm"] for r in rows] == ["5.0", "15.0", "30.0"]
    # One uncalibrated image: back to pixel groups, and the definition says why.
    records[1] = record(1, [box], [0])
    m = run(records, outputs, output_dir=str(tmp_path))
    assert m["num_nodules-size_middle"] == 3
    report = json.loads((tmp_path / "nodule_metrics.json").read_text())
    assert "pixels" in report["size_groups"] and "1 nodules lack" in report["size_groups"]


def test_calibration_and_operating_points_reported():
    probs = [0.1, 0.3, 0.45, 0.6, 0.55, 0.7, 0.8, 0.95]
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    records = [record(i, [BOX], [c]) for i, c in enumerate(labels)]
    outputs = [output([BOX], [0.9], [p]) for p in probs]
    m = run(records, outputs, fixed_threshold=0.5)
    assert m["brier"] == pytest.approx(np.mean((np.array(probs) - np.array(labels)) ** 2))
    assert 0 <= m["ece"] <= 1
    assert m["sensitivity_fixed"] == 1.0 and m["specificity_fixed"] == 0.75
    assert m["fixed_threshold"] == 0.5
    assert m["specificity_fixed_ci_low"] <= 0.75 <= m["specificity_fixed_ci_high"]
    assert m["sensitivity_at_spec90"] == 0.75 and m["specificity_at_sens90"] == 0.75
    assert "sensitivity_fixed" not in run(records, outputs)


def test_group_by_metadata_field():
    records = [record(i, [BOX], [i % 2], age_group="old" if i < 2 else "young") for i in range(4)]
    outputs = [output([BOX], [0.9], [p]) for p in (0.2, 0.9, 0.9, 0.9)]
    m = run(records, outputs, group_by=["age_group"])
    assert m["accuracy-age_group_old"] == 1.0
    assert m["accuracy-age_group_young"] == 0.5
    assert m["num_nodules-age_group_young"] == 2


def test_bootstrap_interval_contains_the_point_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    p = np.clip(y * 0.3 + rng.normal(0.35, 0.25, 80), 0, 1)
    auc = roc_auc_score(y, p)
    assert roc_auc(y, p) == auc and math.isnan(roc_auc([1, 1], [0.2, 0.3]))
    low, high = bootstrap_auc_interval(y, p, 500, seed=1)
    assert low < auc < high and high - low < 0.5
    assert (low, high) == bootstrap_auc_interval(y, p, 500, seed=1)  # seeded
    m = run(*four_images([0.9, 0.1, 0.6, 0.7]))
    assert m["auc_ci_low"] <= m["auc"] <= m["auc_ci_high"]


def test_the_bootstrap_auc_is_sklearns_auc_of_each_resample():
    """The AUC of all resamples at once equals sklearn's on each one, ties (coarse
    probabilities) included, NaN where a resample holds one class; so the interval is the one
    that calling sklearn resample by resample gives."""
    from thyroid_det.evaluation.metrics import rowwise_roc_auc

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, (200, 30)).astype(bool)
    p = np.round(np.clip(y * 0.2 + rng.normal(0.4, 0.25, (200, 30)), 0, 1), 1)  # many ties
    y[7], y[9] = True, False  # one class only
    got = rowwise_roc_auc(y, p)
    want = [roc_auc(t, q) for t, q in zip(y, p)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert math.isnan(got[7]) and math.isnan(got[9]) and np.isfinite(got).sum() == 198

    from thyroid_det.evaluation.operating_points import percentile_interval

    y1, p1 = y[0], p[0]
    idx = np.random.default_rng(5).integers(0, 30, size=(300, 30))
    loop = percentile_interval([roc_auc(y1[i], p1[i]) for i in idx])
    assert bootstrap_auc_interval(y1, p1, 300, seed=5) == pytest.approx(loop, abs=1e-12)


def test_youden_threshold():
    assert youden_threshold([0, 0, 1, 1], [0.1, 0.3, 0.35, 0.8]) == pytest.approx(0.35)
    assert math.isnan(youden_threshold([1, 1], [0.2, 0.9]))
    m = run(*four_images([0.45, 0.1, 0.4, 0.2]))
    assert m["youden_threshold"] == pytest.approx(0.4)
    assert (
        m["sensitivity"] == 0.0 and m["sensitivity_youden"] == 1.0 and m["accuracy_youden"] == 1.0
    )


def test_degenerate_cases(caplog):
    with caplog.at_level(logging.WARNING):
        m = run([record(0, [BOX], [1]), record(1, [BOX], [1])], [output([BOX], [0.9], [0.9])] * 2)
    assert math.isnan(m["auc"]) and math.isnan(m["specificity"]) and m["sensitivity"] == 1.0
    assert "AUC undefined" in caplog.text
    m = run([record(0, [BOX], [1])], [output([], [], [])])
    assert m["recall50"] == 0 and math.isnan(m["accuracy"]) and m["froc_cpm"] == 0
    m = run([], [])
    assert m["num_images"] == 0 and math.isnan(m["recall50"]) and math.isnan(m["auc"])


def test_class_agnostic_skips_diagnosis():
    records = [record(0, [BOX], [0])]
    m = run(records, [output([BOX], [0.9], [0.9])], classes=("nodule",))
    assert "accuracy" not in m and m["recall50"] == 1.0
    m = run(four_images([0.9] * 4)[0], four_images([0.9] * 4)[1], class_agnostic=True)
    assert "auc" not in m and m["froc_cpm"] == 1.0


def test_files_written(tmp_path):
    records, outputs = four_images([0.9, 0.1, 0.6, 0.7])
    outputs[3] = output([FAR], [0.3], [0.2])
    run(records, outputs, output_dir=str(tmp_path))
    report = json.loads((tmp_path / "nodule_metrics.json").read_text(), parse_constant=pytest.fail)
    assert report["metrics"]["num_nodules"] == 4
    assert "small <" in report["size_groups"]
    rows = list(csv.DictReader(open(tmp_path / "nodules.csv")))
    assert len(rows) == 4 and rows[3]["detected"] == "0" and rows[0]["prediction"] == "malignant"
    assert rows[0]["gt_class"] == "malignant" and rows[0]["size_group"] == "middle"
    for png in ("roc.png", "froc.png", "reliability.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob("*.tmp"))


def test_unknown_image_is_named():
    name = register([record(0, [BOX], [1])])
    evaluator = NoduleEvaluator(name, distributed=False)
    evaluator.process([{"image_id": 7, "file_name": "/x/seven.png"}], [output([BOX], [0.9], [0.9])])
    with pytest.raises(KeyError, match="seven.png"):
        evaluator.evaluate()


def test_build_evaluators_class_agnostic_coco(tmp_path):
    cfg = make_cfg()
    cfg.TEST.NODULE_EVAL.BOOTSTRAP = 50
    records, outputs = four_images([0.9, 0.9, 0.9, 0.9])
    name = register(records)
    for agnostic in (False, True):
        evaluators = build_evaluators(
            cfg, name, str(tmp_path / str(agnostic)), class_agnostic=agnostic
        )
        evaluators.reset()
        for rec, out in zip(records, outputs):
            evaluators.process(
                [{"image_id": rec["image_id"], "file_name": rec["file_name"]}], [out]
            )
        results = evaluators.evaluate()
        # Every benign nodule is detected as malignant: benign AP is 0, class-agnostic AP perfect.
        if agnostic:
            assert results["bbox"]["AP50"] == pytest.approx(100.0)
            assert "bbox_agnostic" not in results
        else:
            # the class-aware evaluation carries the class-agnostic AP beside it
            assert results["bbox_agnostic"]["AP50"] == pytest.approx(100.0)
            assert results["bbox"]["AP50"] <= 50.0 and results["bbox"]["AP-benign"] == 0.0
            # Per-class AP50: none of the benign nodules is found as benign; the mean of the
            # per-class figures is COCO's AP50.
            assert results["bbox"]["AP50-benign"] == 0.0
            per_class = (results["bbox"]["AP50-benign"] + results["bbox"]["AP50-malignant"]) / 2
            assert per_class == pytest.approx(results["bbox"]["AP50"])
        assert ("auc" in results["nodule"]) != agnostic


@pytest.mark.tn5000
def test_real_tn5000_val_oracle_and_size_groups(tn5000_datasets):
    """An oracle (every box found, diagnosis given) on tn5000_val scores perfectly, and the
    default size edges (TN5000 train terciles) split the val nodules into similar thirds."""
    records = DatasetCatalog.get("tn5000_val")
    outputs = []
    for r in records:
        boxes = [a["bbox"] for a in r["annotations"]]
        probs = [0.9 if a["category_id"] == 1 else 0.1 for a in r["annotations"]]
        outputs.append(output(boxes, [0.9] * len(boxes), probs))
    name = register(records)
    evaluator = NoduleEvaluator(name, distributed=False, bootstrap=50)
    for rec, out in zip(records, outputs):
        evaluator.process([{"image_id": rec["image_id"], "file_name": rec["file_name"]}], [out])
    m = evaluator.evaluate()["nodule"]
    assert m["recall50"] == 1.0 and m["accuracy"] == 1.0 and m["auc"] == 1.0
    thirds = [m[f"num_nodules-size_{g}"] / m["num_nodules"] for g in ("small", "middle", "large")]
    assert all(0.2 < t < 0.45 for t in thirds), thirds
