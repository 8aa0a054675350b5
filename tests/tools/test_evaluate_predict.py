"""tools/evaluate.py and tools/predict.py end to end: a tiny COCO set, a random-weight model."""

import argparse
import json
import os

import cv2
import numpy as np
import pytest
import torch

CONFIGS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)


def config_path():
    for name in ("mssd_vgg16_synthetic.yaml", "mssd_vgg16.yaml"):
        path = os.path.join(CONFIGS, name)
        if os.path.exists(path):
            return path
    pytest.skip("no SSD config in configs/")


@pytest.fixture
def weights(random_weights):
    return random_weights(config_path())


def nodule_image(rng, height=96, width=128):
    image = rng.integers(20, 60, (height, width)).astype(np.uint8)
    x0, y0 = int(rng.integers(5, width - 45)), int(rng.integers(5, height - 45))
    size = int(rng.integers(15, 40))
    cv2.ellipse(image, (x0 + size // 2, y0 + size // 2), (size // 2, size // 2), 0, 0, 360, 150, -1)
    return image, [x0, y0, size, size]


def write_coco(root, num_images=4, missing=None):
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(num_images):
        image, box = nodule_image(rng)
        file_name = f"img{i}.png"
        if file_name != missing:
            cv2.imwrite(str(root / file_name), image)
        images.append({"id": i + 1, "file_name": file_name, "height": 96, "width": 128})
        annotations.append(
            {
                "id": i + 1,
                "image_id": i + 1,
                "category_id": 1 + i % 2,
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": 0,
            }
        )
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "benign"}, {"id": 2, "name": "malignant"}],
    }
    path = root / "annotations.json"
    path.write_text(json.dumps(coco))
    return str(path)


def model_args(weights, tiny_opts):
    return ["--config-file", config_path(), "--weights", weights], tiny_opts


def evaluate_argv(weights, tiny_opts, json_file, output, *flags):
    head, opts = model_args(weights, tiny_opts)
    image_root = os.path.dirname(json_file)
    return (
        head
        + ["--coco-json", json_file, "--image-root", image_root, "--output", str(output)]
        + (list(flags) + opts)
    )


def predict_argv(weights, tiny_opts, inputs, output, *flags):
    head, opts = model_args(weights, tiny_opts)
    return head + ["--input", str(inputs), "--output", str(output)] + list(flags) + opts


EVALUATE_KEYS = ("bbox.AP", "bbox.AP50", "nodule.recall50", "nodule.accuracy", "nodule.sensitivity",
                 "nodule.specificity", "nodule.auc", "seconds_per_image", "nodule.froc@1fp")  # fmt: skip


def test_evaluate_writes_the_metrics(tmp_path, weights, tool, tiny_opts, capsys):
    evaluate = tool("evaluate")
    json_file = write_coco(tmp_path)
    out = tmp_path / "eval"
    evaluate.main(evaluate_argv(weights, tiny_opts, json_file, out))
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(key in metrics for key in EVALUATE_KEYS), set(EVALUATE_KEYS) - set(metrics)
    assert metrics["seconds_per_image"] > 0 and metrics["num_images"] == 4
    assert 0 <= metrics["nodule.recall50"] <= 1
    for name in ("nodule_metrics.json", "nodules.csv", "froc.png"):
        assert (out / name).exists(), name
    assert "nodule.auc" in capsys.readouterr().out

    out = tmp_path / "agnostic"
    evaluate.main(evaluate_argv(weights, tiny_opts, json_file, out, "--class-agnostic"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert "bbox.AP" in metrics and "nodule.froc_cpm" in metrics
    assert "nodule.accuracy" not in metrics and "bbox.AP-malignant" not in metrics


def test_evaluate_a_cascade(tmp_path, random_weights, tool, tiny_opts):
    mccnn = os.path.join(CONFIGS, "mccnn_synthetic.yaml")
    mccnn = mccnn if os.path.exists(mccnn) else os.path.join(CONFIGS, "mccnn.yaml")
    evaluate = tool("evaluate")
    out = tmp_path / "eval"
    argv = evaluate_argv(random_weights(mccnn), tiny_opts, write_coco(tmp_path), out)
    evaluate.main(["--config-file", mccnn] + argv[2:])
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(key in metrics for key in EVALUATE_KEYS), set(EVALUATE_KEYS) - set(metrics)


def test_evaluate_in_batches_gives_the_single_image_metrics(tmp_path, random_weights, tool, tiny_opts):
    """TEST.IMS_PER_BATCH 3 over 4 images (a short last batch): the cascade's detections, hence
    every metric but the timing, are those of one image at a time."""
    mccnn = os.path.join(CONFIGS, "mccnn_synthetic.yaml")
    mccnn = mccnn if os.path.exists(mccnn) else os.path.join(CONFIGS, "mccnn.yaml")
    evaluate = tool("evaluate")
    json_file = write_coco(tmp_path)
    weights = random_weights(mccnn)
    metrics = {}
    for batch in (1, 3):
        out = tmp_path / f"batch{batch}"
        argv = evaluate_argv(weights, tiny_opts + ["TEST.IMS_PER_BATCH", str(batch)], json_file, out)
        evaluate.main(["--config-file", mccnn] + argv[2:])
        metrics[batch] = json.loads((out / "metrics.json").read_text())
        detections = json.loads((out / "coco_instances_results.json").read_text())
        metrics[batch]["detections"] = np.array(
            sorted((d["image_id"], d["category_id"], d["score"], *d["bbox"]) for d in detections)
        )
    assert metrics[3]["images_per_batch"] == 3 and metrics[1]["images_per_batch"] == 1
    assert len(metrics[1]["detections"]), "the random model should detect something to compare"
    np.testing.assert_allclose(metrics[3].pop("detections"), metrics[1].pop("detections"), atol=1e-4)
    for key in metrics[1]:
        if key not in ("seconds_per_image", "images_per_batch"):
            assert metrics[3][key] == pytest.approx(metrics[1][key], abs=1e-6, nan_ok=True), key


def test_test_loader_batches_every_image_once(tmp_path, tiny_opts):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from thyroid_det.data.datasets.coco import register_coco
    from thyroid_det.engine import Trainer, load_cfg
    from thyroid_det.engine.defaults import ConfigError

    json_file = write_coco(tmp_path, num_images=5)
    name = f"batched_{tmp_path.name}"
    register_coco(name, json_file, str(tmp_path))
    try:
        opts = tiny_opts + ["TEST.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0"]
        cfg = load_cfg(argparse.Namespace(config_file=config_path(), opts=opts))
        batches = list(Trainer.build_test_loader(cfg, name))
        assert [len(b) for b in batches] == [2, 2, 1]
        assert sorted(d["image_id"] for b in batches for d in b) == [1, 2, 3, 4, 5]
        with pytest.raises(ConfigError, match="TEST.IMS_PER_BATCH must be at least 1, got 0"):
            load_cfg(argparse.Namespace(config_file=config_path(), opts=tiny_opts + ["TEST.IMS_PER_BATCH", "0"]))
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_evaluate_names_a_missing_image_or_broken_json(tmp_path, weights, tool, tiny_opts):
    evaluate = tool("evaluate")
    json_file = write_coco(tmp_path, missing="img2.png")
    with pytest.raises(SystemExit, match="missing image: .*img2.png"):
        evaluate.main(evaluate_argv(weights, tiny_opts, json_file, tmp_path / "eval"))
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(SystemExit, match=r"^evaluate.py: error: \S*broken.json: not a usable COCO"):
        evaluate.main(evaluate_argv(weights, tiny_opts, str(broken), tmp_path / "eval"))


def test_predict_reads_every_kind_and_skips_a_corrupt_file(tmp_path, weights, tool, tiny_opts):
    predict = tool("predict")
    inputs = tmp_path / "in"
    inputs.mkdir()
    gray, _ = nodule_image(np.random.default_rng(1))
    cv2.imwrite(str(inputs / "gray8.png"), gray)
    cv2.imwrite(str(inputs / "gray16.png"), gray.astype(np.uint16) * 257)
    cv2.imwrite(str(inputs / "colour.jpg"), cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
    cv2.imwrite(str(inputs / "alpha.png"), cv2.cvtColor(gray, cv2.COLOR_GRAY2BGRA))
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "single"
    argv = predict_argv(
        weights, tiny_opts, inputs, out, "--json-mode", "single", "--min-score", "0"
    )
    result = predict.main(argv)
    assert [os.path.basename(s["file_name"]) for s in result["skipped"]] == ["broken.png"]
    report = json.loads((out / "predictions.json").read_text())
    assert len(report["images"]) == 4 and report["skipped"][0]["file_name"].endswith("broken.png")
    first = report["images"][0]["detections"][0]
    assert set(first) >= {"bbox", "class", "score", "malignant_prob", "class_probs"}
    assert first["class"] in ("benign", "malignant")
    for stem in ("gray8", "gray16", "colour", "alpha"):
        assert cv2.imread(str(out / f"{stem}.png")).shape == (96, 128, 3), stem
    # 16-bit data that is 8-bit data scaled by 257 gives the same predictions.
    by_name = {os.path.basename(r["file_name"]): r["detections"] for r in report["images"]}
    assert by_name["gray8.png"] == by_name["gray16.png"]

    listing = tmp_path / "list.txt"
    listing.write_text("# two images\nin/gray8.png\n\nin/colour.jpg\n")
    out = tmp_path / "per_image"
    result = predict.main(predict_argv(weights, tiny_opts, listing, out))
    assert not result["skipped"]
    assert set(os.listdir(out)) >= {"colour.json", "colour.png", "gray8.json", "gray8.png"}
    assert json.loads((out / "gray8.json").read_text())["height"] == 96
    with pytest.raises(SystemExit, match="--output .* holds the input .*gray8.png"):
        predict.main(predict_argv(weights, tiny_opts, inputs / "gray8.png", inputs))


def test_predict_gives_the_model_what_evaluation_reads(tmp_path, weights, tool, tiny_opts):
    """A colour file reaches the model in colour, as the test mapper reads it: predict.py's
    detections are the model's on evaluate.py's input."""
    from thyroid_det.data.mapper import SSDDatasetMapper
    from thyroid_det.engine import Predictor

    from ..conftest import make_cfg

    predict = tool("predict")
    gray, _ = nodule_image(np.random.default_rng(2))
    colour = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    colour[10:20, 10:60] = (0, 0, 255)  # a red calliper mark
    colour[40:70, 70:110, 0] = 255  # a blue Doppler patch
    path = tmp_path / "colour.png"
    cv2.imwrite(str(path), colour)
    argv = predict_argv(weights, tiny_opts, path, tmp_path / "out", "--min-score", "0")
    detections = predict.main(argv)["images"][0]["detections"]
    got = [{k: v for k, v in det.items() if k != "size"} for det in detections]
    cfg = make_cfg(config_path(), tiny_opts + ["MODEL.WEIGHTS", weights])
    model = Predictor(cfg).model
    record = {"file_name": str(path), "image_id": 0, "height": 96, "width": 128}
    with torch.no_grad():
        instances = model([SSDDatasetMapper(cfg, is_train=False)(record)])[0]["instances"]
    assert got == predict.instances_to_json(instances, predict.DEFAULT_CLASSES)


def test_predict_refuses_weights_that_leave_the_model_random(tmp_path, tool, tiny_opts):
    inputs = tmp_path / "in"
    inputs.mkdir()
    cv2.imwrite(str(inputs / "scan.png"), nodule_image(np.random.default_rng(0))[0])
    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    notes = tmp_path / "notes.pth"
    notes.write_text("not weights")
    for bad, message in ((empty, "empty.pth lacks"), (notes, "notes.pth is not a readable")):
        for name, argv in (
            ("predict", predict_argv(str(bad), tiny_opts, inputs, tmp_path / "out")),
            ("evaluate", evaluate_argv(str(bad), tiny_opts, write_coco(tmp_path), tmp_path / "e")),
        ):
            with pytest.raises(SystemExit, match=f"^{name}.py: error: .*{message}") as info:
                tool(name).main(argv)
            assert "\n" not in str(info.value) and "weights_only" not in str(info.value)
    assert not (tmp_path / "out" / "scan.png").exists()


def test_predict_never_overwrites_an_input(tmp_path, weights, tool, tiny_opts):
    predict = tool("predict")
    folder = tmp_path / "scans"
    folder.mkdir()
    cv2.imwrite(str(folder / "scan1.png"), nodule_image(np.random.default_rng(0))[0])
    (folder / "scan1.json").write_text('{"mine": true}')
    for output in (folder, f"{folder}/"):
        with pytest.raises(SystemExit, match="--output .* holds the input"):
            predict.main(predict_argv(weights, tiny_opts, folder, output))
    listing = tmp_path / "list.txt"
    listing.write_text("scans/scan1.png\n")
    with pytest.raises(SystemExit, match="--output .* holds the input"):
        predict.main(predict_argv(weights, tiny_opts, listing, folder))
    assert json.loads((folder / "scan1.json").read_text()) == {"mine": True}
    predict.main(predict_argv(weights, tiny_opts, folder, folder / "predictions"))
    assert (folder / "predictions" / "scan1.json").exists()


def test_predict_skips_truncated_and_tiny_images(tmp_path, weights, tool, tiny_opts):
    inputs = tmp_path / "in"
    inputs.mkdir()
    cv2.imwrite(str(inputs / "good.jpg"), nodule_image(np.random.default_rng(0))[0])
    data = (inputs / "good.jpg").read_bytes()
    (inputs / "cut.jpg").write_bytes(data[: len(data) // 2])
    cv2.imwrite(str(inputs / "dot.png"), np.zeros((1, 1), np.uint8))
    result = tool("predict").main(predict_argv(weights, tiny_opts, inputs, tmp_path / "out"))
    skipped = {os.path.basename(s["file_name"]): s["error"] for s in result["skipped"]}
    assert set(skipped) == {"cut.jpg", "dot.png"}
    assert "truncated JPEG" in skipped["cut.jpg"] and "too small" in skipped["dot.png"]


def test_output_that_is_a_file(tmp_path, weights, tool, tiny_opts):
    a_file = tmp_path / "taken"
    a_file.write_text("")
    json_file = write_coco(tmp_path)
    with pytest.raises(SystemExit, match="^evaluate.py: error: --output .*taken is a file"):
        tool("evaluate").main(evaluate_argv(weights, tiny_opts, json_file, a_file))
    with pytest.raises(SystemExit, match="^predict.py: error: --output .*taken is a file"):
        tool("predict").main(predict_argv(weights, tiny_opts, tmp_path / "img0.png", a_file))


def test_evaluate_uses_the_real_size_and_drops_empty_boxes(
    tmp_path, weights, tool, tiny_opts, caplog
):
    json_file = write_coco(tmp_path)
    coco = json.loads(open(json_file).read())
    coco["images"][0].update(width=677, height=432)  # as some TN5000 XMLs do
    coco["annotations"].append(dict(coco["annotations"][1], id=99, bbox=[10, 10, 0, 5], area=0))
    open(json_file, "w").write(json.dumps(coco))
    out = tmp_path / "eval"
    tool("evaluate").main(evaluate_argv(weights, tiny_opts, json_file, out))
    assert "img0.png is 128x96, not 677x432" in caplog.text
    assert "dropped 1 boxes with zero or negative width or height" in caplog.text
    assert json.loads((out / "metrics.json").read_text())["num_images"] == 4
