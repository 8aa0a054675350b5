"""tools/benchmark.py: its flags and its report on tiny models (correctness, not speed)."""

import json
import os
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD

from thyroid_det.utils import benchmark_sections

# One thread: on a loaded machine two threads mostly measure the scheduler.
FAST = ["--threads", "1", "--size", "128", "--warmup", "1", "--repeats", "2", "--no-flops"]


class _TwoLevelBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.fine = nn.Conv2d(3, 8, 3, stride=8, padding=1)
        self.coarse = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x):
        fine = self.fine(x)
        return OrderedDict([("0", fine), ("1", self.coarse(fine))])


def _tiny_reference(size, num_classes=3):
    """A torchvision SSD small enough for a test, standing in for SSD300-VGG16."""
    return SSD(
        _TwoLevelBackbone(),
        DefaultBoxGenerator([[2], [2]]),
        tuple(size),
        num_classes,
        image_mean=[0.5] * 3,
        image_std=[0.25] * 3,
    )


@pytest.fixture(scope="module")
def benchmark(tool):
    return tool("benchmark")


def test_full_report_on_tiny_models(benchmark, tiny_opts, monkeypatch, tmp_path):
    monkeypatch.setattr(benchmark_sections, "build_reference", _tiny_reference)
    monkeypatch.setattr(benchmark_sections, "REFERENCE_MIN_SIZE", 32)
    output = tmp_path / "out" / "bench.json"
    threads = torch.get_num_threads()
    results = benchmark.main(
        FAST
        + ["--batch", "2", "--train-batch", "2", "--detections", "1", "3"]
        + ["--refiner-detections", "2", "--mapper-images", "2", "--profile", "3"]
        + ["--output", str(output), "--opts"]
        + tiny_opts
    )
    assert torch.get_num_threads() == threads, "the thread count must be restored"
    assert json.loads(output.read_text()) == json.loads(json.dumps(results))
    assert os.listdir(output.parent) == ["bench.json"], "no temporary file left behind"

    rows = {(r["model"], r["kind"], r["batch"]): r for r in results["rows"]}
    for model in ("reference", "ec"):
        for key in ((model, "inference", 1), (model, "inference", 2), (model, "train_step", 2)):
            assert key in rows
    assert ("ec_matched", "inference", 1) in rows and ("ec_matched", "train_step", 2) in rows
    for row in results["rows"]:
        assert len(row["times_s"]) == 2 and row["q1_s"] <= row["median_s"] <= row["q3_s"]
        assert row["per_image_s"] == pytest.approx(row["median_s"] / row["batch"])
        if row["model"] not in ("reference", "mapper"):
            assert row["vs_reference"] > 0

    # Paired ratio: the median of per-round ratios of models timed in turns.
    ec, ref = rows[("ec", "inference", 1)], rows[("reference", "inference", 1)]
    assert ec["group"] == ref["group"]
    per_round = sorted(a / b for a, b in zip(ec["times_s"], ref["times_s"]))
    assert ec["vs_reference"] == pytest.approx(sum(per_round) / 2)

    cascade = [r for r in results["rows"] if r["model"] == "cascade" and "detections" in r]
    assert [r["detections_refined"] for r in cascade] == [1.0, 3.0]
    assert all(r["vs_ec"] > 0 for r in cascade)
    assert rows[("refiner", "inference, 2 detections", 1)]["per_crop_s"] > 0
    for stage in ("refiner", "joint"):
        assert ("cascade", f"train_step ({stage})", 2) in rows
    assert rows[("mapper", "train mapping, 1 worker", 2)]["images_per_s"] > 0

    models = results["models"]
    assert models["reference"]["anchors"] > 0 and models["ec"]["anchors"] > 0
    assert models["matmul_peak"]["gflops_per_s"] > 0
    assert {f["figure"] for f in results["figures"]} == {
        "ec_inference_vs_reference",
        "cascade_vs_ec_up_to_10",
        "train_vs_reference",
        "mapper_feeds_training",
    }
    assert all(f["value"] > 0 for f in results["figures"])
    assert "ec/inference" in results["profiles"]
    assert len(results["profiles"]["ec/inference"]["top_ops"]) == 3
    assert "Self CPU" in results["profiles"]["ec/inference"]["table"]  # torch.profiler's table
    assert len(results["load_average_start"]) == 3
    assert results["settings"]["size_hw"] == [128, 128]


def test_amp_channels_last_flops_no_train_on_cpu(benchmark, tiny_opts):
    results = benchmark.main(
        FAST[:-1]
        + ["--amp", "--channels-last", "--size", "96", "128", "--train-batch", "1"]
        + ["--only", "ec", "refiner", "--refiner-detections", "1", "--no-train", "--opts"]
        + tiny_opts
    )
    assert results["settings"]["size_hw"] == [96, 128]
    assert results["settings"]["amp"] and results["settings"]["channels_last"]
    assert results["settings"]["clock"] == "wall" and not results["settings"]["unfused"]
    assert results["models"]["ec"]["gflops"] > 0
    assert results["models"]["refiner"]["gflops_per_crop"] > 0
    assert {r["model"] for r in results["rows"]} == {"ec", "refiner"}
    assert not any(r["kind"].startswith("train") for r in results["rows"])


def test_bad_arguments(benchmark):
    with pytest.raises(ValueError, match="at least 264 px"):
        benchmark.main(FAST + ["--only", "reference"])
    with pytest.raises(SystemExit):
        benchmark.main(["--size", "1", "2", "3"])
    with pytest.raises(SystemExit):
        benchmark.main(["--config-file", "missing.yaml"])
    with pytest.raises(SystemExit):
        benchmark.main(["--clock", "gpu"])


def test_cpu_clock_times_the_unfused_cascade(benchmark, tiny_opts):
    results = benchmark.main(
        FAST + ["--clock", "cpu", "--unfused", "--only", "cascade", "--detections", "1"]
        + ["--no-train", "--opts"] + tiny_opts
    )
    assert results["settings"]["clock"] == "cpu" and results["settings"]["unfused"]
    rows = [r for r in results["rows"] if r["model"] == "cascade"]
    assert rows and all(r["median_s"] > 0 and r["vs_ec"] > 0 for r in rows)


def test_compiled_refiner_rows(benchmark, tiny_opts):
    results = benchmark.main(
        FAST + ["--compile-refiner", "default", "--only", "refiner", "--refiner-detections", "2"]
        + ["--opts"] + tiny_opts
    )
    assert results["settings"]["compile_refiner"] == "default"
    rows = [r for r in results["rows"] if r["model"] == "refiner"]
    assert [r["detections"] for r in rows] == [2] and rows[0]["median_s"] > 0


def test_real_reference_is_torchvisions_ssd300_at_the_requested_size(benchmark):
    model = benchmark_sections.build_reference((320, 400))
    assert type(model).__name__ == "SSD"
    assert model.transform.fixed_size == (400, 320)  # (width, height)
    assert model.transform.min_size == (320,) and model.transform.max_size == 400
    assert model.head.classification_head.num_columns == 3
