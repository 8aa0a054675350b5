"""The multi-process path on two CPU processes (gloo): DDP training of the cascade under both
schedules, with the sequential schedule's DDP re-wrap, the evaluators' gather, and a process's
error reaching the launcher."""
import json
import math
import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def workers(monkeypatch):
    monkeypatch.syspath_prepend(HERE)
    import ddp_workers

    return ddp_workers


@pytest.fixture
def two_processes(phantom_root, monkeypatch):
    """``run(func, *args)`` on two CPU processes through thyroid_det's launch (gloo)."""
    from thyroid_det.engine import launch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return lambda func, *args: launch(func, 2, dist_url="auto", args=args)


@pytest.mark.parametrize("schedule", ["sequential", "joint"])
def test_cascade_trains_on_two_processes(two_processes, workers, tiny_opts, tmp_path, schedule):
    opts = tiny_opts + ["MODEL.MCCNN.SCHEDULE", schedule, "MODEL.MCCNN.DETECTOR_ITERS", "2",
            "SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "100",
            "OUTPUT_DIR", str(tmp_path / "train")]  # fmt: skip
    report = tmp_path / "report.json"
    two_processes(workers.train, opts, str(report))
    got = json.loads(report.read_text())
    assert got["ddp"] and got["iter"] == 4
    assert got["stage"] == ("refiner" if schedule == "sequential" else "joint")
    # Trainer's re-wrap: each stage of the sequential schedule leaves one network without
    # gradients.
    assert got["find_unused_parameters"]
    assert got["checksums"][0] == pytest.approx(got["checksums"][1], rel=1e-9, abs=1e-9)
    assert (tmp_path / "train" / "model_final.pth").is_file()


def test_distributed_evaluation_equals_single_process(
    two_processes, workers, tiny_opts, random_weights, tmp_path
):
    weights = random_weights(workers.CONFIG)
    run = (tiny_opts, weights)
    two_processes(workers.evaluate, *run, str(tmp_path / "two"), str(tmp_path / "two.json"))
    workers.evaluate(*run, str(tmp_path / "one"), str(tmp_path / "one.json"))
    two = json.loads((tmp_path / "two.json").read_text())
    one = json.loads((tmp_path / "one.json").read_text())
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert set(two["metrics"]) == set(one["metrics"]) and "nodule.recall50" in one["metrics"]
    for key, value in one["metrics"].items():
        other = two["metrics"][key]
        assert (value is None or math.isnan(value)) == (other is None or math.isnan(other)), key
        if value is not None and not math.isnan(value):
            assert other == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_a_user_error_in_a_process_is_raised_as_itself(two_processes, workers):
    """A tool then prints it on one line, as with one process; a bug keeps torch's exception,
    which holds the process's traceback."""
    from thyroid_det.data.datasets import DatasetFormatError

    with pytest.raises(DatasetFormatError, match="^a.json: broken$") as info:
        two_processes(workers.fail_on_main, DatasetFormatError("a.json: broken"))
    assert isinstance(info.value.__cause__, torch.multiprocessing.ProcessRaisedException)
    # torch reports the process that ends first: this one's KeyError or the other's lost peer.
    with pytest.raises(torch.multiprocessing.ProcessRaisedException):
        two_processes(workers.fail_on_main, KeyError("bug"))
