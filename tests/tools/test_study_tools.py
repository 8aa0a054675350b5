"""tools/cross_validate.py and tools/classifier_study.py end to end on phantoms, tiny models."""

import json
import math
import os

import pytest

CONFIGS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)
# Two iterations per fold: the test checks the plumbing, not the learning.
TRAIN_FAST = {
    "SOLVER.IMS_PER_BATCH": "2",
    "SOLVER.MAX_ITER": "2",
    "SOLVER.WARMUP_ITERS": "0",
    "SOLVER.STEPS": "()",
    "SOLVER.CHECKPOINT_PERIOD": "1000",
    "TEST.EVAL_PERIOD": "0",
}


def config(name, fallback):
    for candidate in (name, fallback):
        path = os.path.join(CONFIGS, candidate)
        if os.path.exists(path):
            return path
    pytest.skip(f"configs/{name} not written yet")


def test_cross_validate_trains_and_summarises_each_fold(tmp_path, phantom_root, tool, tiny_opts):
    cross_validate = tool("cross_validate")
    out = tmp_path / "cv"
    argv = (
        [
            "--config-file",
            config("mssd_vgg16_synthetic.yaml", "mssd_vgg16.yaml"),
            "--dataset",
            "synthetic_tiny",
            "--folds",
            "2",
        ]
        + tiny_opts
        + [item for pair in TRAIN_FAST.items() for item in pair]
        + ["OUTPUT_DIR", str(out)]
    )
    summary = cross_validate.cli(argv)
    for i in range(2):
        assert (out / f"fold_{i}" / "model_final.pth").exists()
        fold_metrics = json.loads((out / f"fold_{i}" / "fold_metrics.json").read_text())
        assert "nodule.recall50" in fold_metrics
    report = json.loads((out / "cv_metrics.json").read_text())
    assert len(report["per_fold"]) == 2 and report["n"]["bbox.AP"] == 2
    folds = [f["nodule.num_nodules"] for f in report["per_fold"]]
    assert report["mean"]["nodule.num_nodules"] == pytest.approx(sum(folds) / 2)
    assert summary["std"]["bbox.AP"] is not None and not math.isnan(summary["std"]["bbox.AP"])

    # --resume keeps finished folds instead of training again.
    (out / "fold_0" / "model_final.pth").unlink()
    cross_validate.cli(["--resume"] + argv)
    assert not (out / "fold_0" / "model_final.pth").exists()
    assert json.loads((out / "cv_metrics.json").read_text())["per_fold"] == report["per_fold"]


def test_cross_validate_keeps_the_training_log_and_resumes_an_unfinished_fold(
    tmp_path, phantom_root, tool, monkeypatch
):
    """A fold's result is its own file: training's metrics.json (detectron2's JSONWriter appends
    to it in the same folder) stays the learning curve, and a fold killed while training, which
    has that log but no result, is trained again by --resume."""
    cross_validate = tool("cross_validate")
    trained = []

    def train_fold(cfg, resume):  # what run_fold leaves on disk, without the training
        trained.append(os.path.basename(cfg.OUTPUT_DIR))
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        with open(os.path.join(cfg.OUTPUT_DIR, "metrics.json"), "a") as f:
            f.write('{"iteration": 0, "total_loss": 2.0}\n{"iteration": 1, "total_loss": 1.5}\n')
        return {"bbox.AP": 10.0 * len(trained), "nodule.recall50": 0.5}

    monkeypatch.setattr(cross_validate, "run_fold", train_fold)
    out = tmp_path / "cv"
    argv = ["--config-file", config("mssd_vgg16_synthetic.yaml", "mssd_vgg16.yaml"),
            "--dataset", "synthetic_tiny", "--folds", "2", "OUTPUT_DIR", str(out)]  # fmt: skip
    cross_validate.cli(argv)
    assert trained == ["fold_0", "fold_1"]
    for i in range(2):
        log = (out / f"fold_{i}" / "metrics.json").read_text().splitlines()
        assert [json.loads(line)["iteration"] for line in log] == [0, 1]
        result = json.loads((out / f"fold_{i}" / "fold_metrics.json").read_text())
        assert result["bbox.AP"] == 10.0 * (i + 1)

    (out / "fold_1" / "fold_metrics.json").unlink()  # fold 1 killed after its training log began
    trained.clear()
    summary = cross_validate.cli(["--resume"] + argv)
    assert trained == ["fold_1"]
    assert [f["bbox.AP"] for f in summary["per_fold"]] == [10.0, 10.0]


def test_cross_validate_names_an_unregistered_dataset(tmp_path, tool, tiny_opts):
    cross_validate = tool("cross_validate")
    argv = ["--config-file", config("mssd_vgg16_synthetic.yaml", "mssd_vgg16.yaml"),
            "--dataset", "no_such_set"] + tiny_opts + ["OUTPUT_DIR", str(tmp_path / "cv")]
    with pytest.raises(SystemExit, match="^cross_validate.py: error: dataset 'no_such_set' is not"):
        cross_validate.cli(argv)


def study_argv(config_file, random_weights, output, extra=()):
    """classifier_study.py's arguments: the config's random tiny weights on synthetic_tiny."""
    return [
        "--config-file", config_file, "--weights", random_weights(config_file),
        "--dataset", "synthetic_tiny", "--output", str(output), *extra,
    ]  # fmt: skip


def test_classifier_study_reports_every_classifier(
    tmp_path, phantom_root, tool, tiny_opts, random_weights, monkeypatch
):
    from thyroid_det.modeling.refiner_nets import AlexNet

    study = tool("classifier_study")
    config_file = config("mccnn_synthetic.yaml", "mccnn.yaml")
    out = tmp_path / "study"
    extra = ["--test-dataset", "synthetic_tiny", "--quick", "--cv", "2"]
    crop_sides, features = set(), AlexNet.features
    monkeypatch.setattr(
        AlexNet, "features", lambda net, x: crop_sides.add(x.shape[-1]) or features(net, x)
    )
    opts = tiny_opts + ["MODEL.REFINER.TEST_INPUT_SIZE", "72"]
    report = study.main(study_argv(config_file, random_weights, out, extra) + opts)
    assert crop_sides == {72}  # the crops the cascade reads at inference, not training's 64
    names = set(report["results"])
    assert len(names) == 8 and "refiner softmax" in names and "gradient-boosted trees" in names
    for result in report["results"].values():
        assert 0 <= result["accuracy"] <= 1 and 0 <= result["auc"] <= 1
    assert report["feature_dim"] == 16
    assert (
        json.loads((out / "classifier_study.json").read_text())["test"]["nodules"]
        == report["test"]["nodules"]
    )
    assert (out / "classifier_rocs.png").read_bytes()[:4] == b"\x89PNG"


def test_classifier_study_rejects_a_model_without_refiner(
    tmp_path, tool, tiny_opts, random_weights
):
    study = tool("classifier_study")
    config_file = config("mssd_vgg16_synthetic.yaml", "mssd_vgg16.yaml")
    with pytest.raises(SystemExit, match="has no refiner"):
        study.main(study_argv(config_file, random_weights, tmp_path) + tiny_opts)
