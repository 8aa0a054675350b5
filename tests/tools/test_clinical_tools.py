"""DICOM in and millimetres out, the HTML report, image-level evaluation, fixed thresholds and
temperature scaling, end to end through the tools on files the tests write."""

import csv
import importlib.util
import json
import os

import cv2
import numpy as np
import pytest
import torch

from thyroid_det.modeling.temperature import TEMPERATURE_KEY

# The tiny COCO set, images and argument lists of the evaluate/predict tests.
_spec = importlib.util.spec_from_file_location(
    "evaluate_predict_helpers", os.path.join(os.path.dirname(__file__), "test_evaluate_predict.py")
)
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)
evaluate_argv, nodule_image = _helpers.evaluate_argv, _helpers.nodule_image
predict_argv, write_coco = _helpers.predict_argv, _helpers.write_coco
weights = _helpers.weights  # the random-weight model fixture


def dicom_inputs(folder, make_dicom):
    """A calibrated, an uncalibrated, a 3-frame (RLE) and an RGB DICOM file."""
    from pydicom.uid import RLELossless

    rng = np.random.default_rng(3)
    gray, _ = nodule_image(rng)
    folder.mkdir()
    make_dicom(folder / "calibrated.dcm", gray, calibration=("us", 0.1, 0.1))
    make_dicom(folder / "plain.dcm", gray)
    cine = np.stack([gray, np.roll(gray, 5, axis=1), np.roll(gray, 9, axis=0)])
    make_dicom(folder / "cine.dcm", cine, ("us", 0.2, 0.2), transfer_syntax=RLELossless)
    make_dicom(folder / "colour.dcm", np.repeat(gray[:, :, None], 3, axis=2), ("spacing", 0.1, 0.1))
    return gray


def test_predict_dicom_sizes_frames_and_html_report(tmp_path, weights, tool, tiny_opts, make_dicom):
    predict = tool("predict")
    dicom_inputs(tmp_path / "in", make_dicom)
    out = tmp_path / "out"
    result = predict.main(predict_argv(weights, tiny_opts, tmp_path / "in", out, "--min-score", "0"))
    assert not result["skipped"]
    by_name = {}
    for image in result["images"]:
        stem = os.path.splitext(os.path.basename(image["file_name"]))[0]
        by_name.setdefault(stem, []).append(image)
    assert [i["frame"] for i in by_name["cine"]] == [0, 1, 2]
    for name in ("cine_f000", "cine_f002", "calibrated", "plain", "colour"):
        assert (out / f"{name}.png").exists() and (out / f"{name}.json").exists(), name
    calibrated = by_name["calibrated"][0]
    assert calibrated["calibration"] == "SequenceOfUltrasoundRegions"
    det = calibrated["detections"][0]
    x0, y0, x1, y1 = det["bbox"]
    assert det["size"]["width_mm"] == pytest.approx((x1 - x0) * 0.1, abs=0.01)
    assert det["size"]["diameter_mm"] == pytest.approx(
        np.sqrt((x1 - x0) * (y1 - y0)) * 0.1, abs=0.02
    )
    assert by_name["colour"][0]["calibration"] == "PixelSpacing"
    plain = by_name["plain"][0]["detections"][0]["size"]
    assert plain["calibration"] == "none" and "no physical calibration" in plain["reason"]

    page = (out / "report.html").read_text()
    assert page.count("<tr>") == 1 + 6  # header + 6 frames/images
    assert page.count('src="data:image/jpeg;base64,') == 6
    assert "sortBy" in page and " mm" in page and "uncalibrated" in page
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from anywhere


def test_predict_output_names_never_collide(tmp_path, weights, tool, tiny_opts, make_dicom):
    """A name numbered for one input, or given to a cine frame, is never given again: each
    output keeps its own drawing and JSON. A folder's DICOM files without an extension, or named
    by their UID, are inputs, named by their whole name."""
    gray, _ = nodule_image(np.random.default_rng(4))
    for rel in ("x/a.png", "y/a.png", "a_1.png", "scan_f000.png", "A.png"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / rel), gray)
    make_dicom(tmp_path / "scan.dcm", np.stack([gray, gray]))
    pacs = tmp_path / "pacs"
    pacs.mkdir()
    make_dicom(pacs / "IM000001", gray)
    make_dicom(pacs / "1.2.840.99.7", gray)  # named by its UID: the dots are no extension
    (pacs / "notes").write_text("not an image")
    listing = tmp_path / "list.txt"
    listing.write_text("x/a.png\ny/a.png\na_1.png\nscan.dcm\nscan_f000.png\nA.png\n")
    out = tmp_path / "out"
    argv = predict_argv(weights, tiny_opts, listing, out)
    argv.insert(argv.index("--output"), str(pacs))
    result = tool("predict").main(argv)
    assert not result["skipped"]
    expected = {
        "a": ("x/a.png", None), "a_1": ("y/a.png", None), "a_1_1": ("a_1.png", None),
        "scan_f000": ("scan.dcm", 0), "scan_f001": ("scan.dcm", 1),
        "scan_f000_1": ("scan_f000.png", None), "A_2": ("A.png", None),
        "IM000001": ("pacs/IM000001", None), "1.2.840.99.7": ("pacs/1.2.840.99.7", None),
    }  # fmt: skip
    written = {f for f in os.listdir(out) if f.endswith((".json", ".png"))}
    assert written == {f"{name}.{ext}" for name in expected for ext in ("json", "png")}
    for name, (rel, frame) in expected.items():
        record = json.loads((out / f"{name}.json").read_text())
        assert os.path.relpath(record["file_name"], tmp_path) == rel, name
        assert record.get("frame") == frame, name


def test_evaluate_a_coco_set_of_dicom_files(tmp_path, weights, tool, tiny_opts, make_dicom):
    """DICOM in dataset registration: calibration gives size groups in millimetres; a COCO
    image entry's "frame" picks a cine frame."""
    evaluate = tool("evaluate")
    json_file = write_coco(tmp_path)
    coco = json.loads(open(json_file).read())
    for i, image in enumerate(coco["images"]):
        gray = cv2.imread(str(tmp_path / image["file_name"]), 0)
        stem = os.path.splitext(image["file_name"])[0]
        if i == 0:
            make_dicom(tmp_path / f"{stem}.dcm", np.stack([gray * 0, gray]), ("us", 0.1, 0.1))
            image["frame"] = 1
        else:
            make_dicom(tmp_path / f"{stem}.dcm", gray, ("us", 0.5, 0.5))
        image["file_name"] = f"{stem}.dcm"
    dicom_json = tmp_path / "dicom.json"
    dicom_json.write_text(json.dumps(coco))
    out = tmp_path / "eval"
    metrics = evaluate.main(evaluate_argv(weights, tiny_opts, str(dicom_json), out))
    report = json.loads((out / "nodule_metrics.json").read_text())
    assert "millimetres" in report["size_groups"]
    assert sum(report["size_group_counts"].values()) == 4
    assert "nodule.ece" in metrics and (out / "reliability.png").exists()

    coco["images"][0]["frame"] = 5
    dicom_json.write_text(json.dumps(coco))
    with pytest.raises(SystemExit, match="img0.dcm.*frame 5"):
        evaluate.main(evaluate_argv(weights, tiny_opts, str(dicom_json), tmp_path / "bad"))


def test_threshold_fixed_on_one_run_applied_to_another(tmp_path, weights, tool, tiny_opts):
    evaluate = tool("evaluate")
    validation = tmp_path / "val_run"
    validation.mkdir()
    rows = [("malignant", 0.8), ("malignant", 0.6), ("benign", 0.3), ("benign", 0.7)]
    with open(validation / "nodules.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["gt_class", "malignant_prob"])
        writer.writerows(rows)
    out = tmp_path / "test_run"
    argv = evaluate_argv(weights, tiny_opts, write_coco(tmp_path), out)
    argv[argv.index("--output"):argv.index("--output")] = [
        "--threshold-from", str(validation), "--target", "sensitivity>=1"
    ]
    metrics = evaluate.main(argv)
    assert metrics["nodule.fixed_threshold"] == pytest.approx(0.6)
    assert "nodule.sensitivity_fixed_ci_low" in metrics or np.isnan(metrics["nodule.auc"])
    with pytest.raises(SystemExit, match="no nodules.csv or images.csv"):
        evaluate.main([str(tmp_path) if a == str(validation) else a for a in argv])


def test_image_level_csv(tmp_path, weights, tool, tiny_opts, make_dicom, capsys):
    evaluate = tool("evaluate")
    images = tmp_path / "ext"
    dicom_inputs(images, make_dicom)
    (images / "broken.dcm").write_bytes(b"not dicom")
    labels = images / "labels.csv"
    labels.write_text(
        "image,label\ncalibrated.dcm,malignant\nplain.dcm,benign\ncine.dcm,1\ncolour.dcm,0\n"
        "broken.dcm,benign\n"
    )
    head = ["--config-file", evaluate_argv(weights, [], "x", "y")[1], "--weights", weights]
    out = tmp_path / "eval"
    metrics = evaluate.main(
        head + ["--image-labels", str(labels), "--output", str(out), "--min-score", "0"] + tiny_opts
    )
    assert metrics["num_images"] == 5 and metrics["num_scored"] == 4
    assert metrics["num_unreadable"] == 1 and "broken.dcm" in next(iter(metrics["unreadable"]))
    assert 0 <= metrics["accuracy"] <= 1 and "auc_ci_low" in metrics
    rows = list(csv.DictReader(open(out / "images.csv")))
    assert len(rows) == 5 and rows[2]["frame"] in ("0", "1", "2")
    # Nothing detected at all: every image counted and listed, metrics undefined.
    out = tmp_path / "none"
    metrics = evaluate.main(
        head + ["--image-labels", str(labels), "--output", str(out), "--min-score", "2"] + tiny_opts
    )
    assert metrics["num_no_detection"] == 4 and len(metrics["no_detection"]) == 4
    assert "no detection:" in capsys.readouterr().out
    labels.write_text("image,label\nplain.dcm,maybe\n")
    with pytest.raises(SystemExit, match="labels.csv:2: label 'maybe'"):
        evaluate.main(head + ["--image-labels", str(labels), "--output", str(out)] + tiny_opts)


def over_confident_run(run, rng):
    """An evaluate.py run folder whose nodules.csv is over-confident by T = 3; (y, p) of it."""
    run.mkdir()
    p_true = rng.uniform(0.05, 0.95, 300)
    y = rng.random(300) < p_true
    sharp = 1 / (1 + np.exp(-3 * np.log(p_true / (1 - p_true))))
    with open(run / "nodules.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["gt_class", "malignant_prob"])
        writer.writerows(("malignant" if t else "benign", f"{q:.6f}") for t, q in zip(y, sharp))
    return y.astype(int), np.round(sharp, 6)


def test_fit_temperature_is_stored_and_applied(tmp_path, weights, tool, tiny_opts):
    fit = tool("fit_temperature")
    run = tmp_path / "val_run"
    rng = np.random.default_rng(0)
    over_confident_run(run, rng)
    out = tmp_path / "fit"
    config = evaluate_argv(weights, [], "x", "y")[1]
    summary = fit.main(
        ["--config-file", config, "--weights", weights, "--from-run", str(run), "--output", str(out)]
    )
    assert summary["malignancy_temperature"] == pytest.approx(3.0, rel=0.25)
    assert summary["after"]["ece"] < summary["before"]["ece"]
    assert (out / "reliability_temperature.png").exists()
    stored = torch.load(out / "model_temperature.pth", weights_only=True)
    assert stored[TEMPERATURE_KEY] == pytest.approx(summary["malignancy_temperature"])

    # predict.py applies it: same boxes, probabilities pulled towards 0.5 by the temperature.
    predict = tool("predict")
    image_dir = tmp_path / "img"
    image_dir.mkdir()
    cv2.imwrite(str(image_dir / "a.png"), nodule_image(rng)[0])
    plain = predict.main(predict_argv(weights, tiny_opts, image_dir, tmp_path / "p1", "--min-score", "0"))
    scaled_weights = str(out / "model_temperature.pth")
    scaled = predict.main(
        predict_argv(scaled_weights, tiny_opts, image_dir, tmp_path / "p2", "--min-score", "0")
    )
    t = summary["malignancy_temperature"]
    for a, b in zip(plain["images"][0]["detections"], scaled["images"][0]["detections"]):
        assert a["bbox"] == b["bbox"]
        logit = np.log(a["malignant_prob"] / (1 - a["malignant_prob"]))
        assert b["malignant_prob"] == pytest.approx(1 / (1 + np.exp(-logit / t)), abs=1e-4)


def fit_temperature_argv(weights, run, output, *rest):
    config = evaluate_argv(weights, [], "x", "y")[1]
    return ["--config-file", config, "--weights", str(weights), "--from-run", str(run),
            "--output", str(output), *rest]  # fmt: skip


def test_fit_temperature_never_overwrites_its_weights(tmp_path, weights, tool):
    """Re-fitting a fitted checkpoint into its own folder would replace the input in place."""
    fit = tool("fit_temperature")
    run = tmp_path / "val_run"
    over_confident_run(run, np.random.default_rng(1))
    out = tmp_path / "fit"
    out.mkdir()
    fitted = out / "model_temperature.pth"
    fitted.write_bytes(open(weights, "rb").read())
    before = fitted.read_bytes()
    with pytest.raises(SystemExit, match=r"^fit_temperature.py: error: the default --save-weights "
                       r".*model_temperature.pth is the input"):  # fmt: skip
        fit.main(fit_temperature_argv(fitted, run, out))
    with pytest.raises(SystemExit, match="^fit_temperature.py: error: --save-weights .* is the in"):
        fit.main(fit_temperature_argv(fitted, run, tmp_path / "b", "--save-weights", str(fitted)))
    assert fitted.read_bytes() == before


def test_fit_temperature_names_a_corrupt_checkpoint(tmp_path, tool):
    fit = tool("fit_temperature")
    run = tmp_path / "val_run"
    over_confident_run(run, np.random.default_rng(1))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=r"^fit_temperature.py: error: \S*bad.pth is not a read"):
        fit.main(fit_temperature_argv(bad, run, tmp_path / "fit"))


def test_fit_temperature_counts_bins_as_the_config_says(tmp_path, weights, tool):
    """ECE in the evaluator's bins (TEST.NODULE_EVAL.CALIBRATION_BINS), not a fixed 10."""
    from thyroid_det.evaluation.calibration import calibration_metrics

    fit = tool("fit_temperature")
    run = tmp_path / "val_run"
    y, p = over_confident_run(run, np.random.default_rng(1))
    # Three bins, as the middle one spans 0.5, where this model's error changes sign.
    assert abs(calibration_metrics(y, p, 3)["ece"] - calibration_metrics(y, p, 10)["ece"]) > 1e-3
    bins = ["TEST.NODULE_EVAL.CALIBRATION_BINS", "3"]
    summary = fit.main(fit_temperature_argv(weights, run, tmp_path / "fit", *bins))
    assert summary["before"]["ece"] == pytest.approx(calibration_metrics(y, p, 3)["ece"])
