"""thyroid_det.utils.benchmark: the round-robin timer, paired ratios and synthetic inputs."""

import time

import pytest
import torch

from thyroid_det.utils.benchmark import (
    Benchmark,
    add_ratios,
    find_row,
    headline_figures,
    paired_ratio,
)
from thyroid_det.utils.benchmark_models import random_detections, synthetic_batch


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # A load spike in round 2 slows both alike: the paired ratio ignores it, a ratio of medians
    # would not.
    assert paired_ratio([2.0, 20.0, 2.2], [1.0, 10.0, 1.0]) == pytest.approx(2.0)


def test_round_robin_takes_turns_after_the_warm_up():
    calls = []
    bench = Benchmark(warmup=2)
    group, timings = bench.time_round_robin(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3
    )
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert group == 1 and bench.time_round_robin({"a": lambda: None}, 1)[0] == 2
    for timing in timings.values():
        assert len(timing["times_s"]) == 3
        assert timing["q1_s"] <= timing["median_s"] <= timing["q3_s"]
        assert timing["iqr_s"] == pytest.approx(timing["q3_s"] - timing["q1_s"])


def test_cpu_clock_leaves_out_waiting():
    bench = Benchmark(warmup=0, clock="cpu")
    _, timings = bench.time_round_robin({"sleep": lambda: time.sleep(0.05)}, repeats=2)
    assert timings["sleep"]["median_s"] < 0.02  # asleep, the process uses no CPU time
    _, timings = Benchmark(warmup=0).time_round_robin({"sleep": lambda: time.sleep(0.05)}, 1)
    assert timings["sleep"]["median_s"] >= 0.05
    with pytest.raises(ValueError, match="clock"):
        Benchmark(clock="gpu")


def test_rows_and_ratios():
    bench = Benchmark()
    timing = {"median_s": 0.2, "q1_s": 0.1, "q3_s": 0.3, "iqr_s": 0.2}
    ref = bench.add("reference", "inference", 1, {**timing, "times_s": [1.0, 2.0, 4.0]}, group=1)
    ours = bench.add("ec", "inference", 1, {**timing, "times_s": [1.5, 2.0, 8.0]}, group=1)
    other = bench.add("ec", "inference", 2, {**timing, "times_s": [0.4]}, group=2)
    assert ref["per_image_s"] == 0.2 and other["per_image_s"] == 0.1 and other["images_per_s"] == 10
    add_ratios(bench)
    assert ours["vs_reference"] == pytest.approx(1.5)  # paired: median of 1.5, 1.0, 2.0
    assert other["vs_reference"] is None  # no reference row at batch 2
    assert find_row(bench.rows, "ec", "inference", 2) is other
    assert find_row(bench.rows, "cascade", "inference") is None
    figures = {f["figure"]: f["value"] for f in headline_figures(bench)}
    assert set(figures) == {
        "ec_inference_vs_reference", "cascade_vs_ec_up_to_10", "train_vs_reference",
        "mapper_feeds_training",
    }
    assert all(v is None for v in figures.values())  # none of those rows were measured


def test_profile_keeps_the_costliest_ops_and_the_profilers_table():
    bench = Benchmark(profile=2)
    a = torch.randn(64, 64)
    bench.profile("mm", lambda: torch.mm(a, a).relu())
    prof = bench.profiles["mm"]
    assert len(prof["top_ops"]) == 2 and "Self CPU" in prof["table"]
    Benchmark().profile("off", lambda: None)  # profile=0: nothing recorded, no error


def test_synthetic_inputs_are_seeded_and_inside_the_image():
    images, targets = synthetic_batch(3, (40, 60), seed=0)
    again, _ = synthetic_batch(3, (40, 60), seed=0)
    assert images.shape == (3, 40, 60) and images.dtype == torch.uint8
    assert torch.equal(images, again)
    for boxes, classes in targets:
        assert 1 <= len(boxes) <= 3 and set(classes.tolist()) <= {0, 1}
        assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes[:, 2] <= 60).all()
        assert (boxes[:, 3] <= 40).all() and (boxes >= 0).all()
    detections = random_detections(5, (40, 60), seed=0, device="cpu")
    assert len(detections) == 5 and detections.class_probs.sum(1).allclose(torch.ones(5))
