"""SOLVER.TIME_BUDGET: the schedule shrunk by one factor to fit the minutes, never lengthened,
the stage change kept on an evaluation, and a resumed run kept on the schedule it was fitted."""
import json
import os

import pytest

from thyroid_det.engine import budget
from thyroid_det.engine.budget import fit_schedule

from ..conftest import CONFIGS, make_cfg


def test_a_shrunk_mccnn_schedule_keeps_its_shape():
    cfg = make_cfg("mccnn_cpu.yaml")
    warmup = cfg.SOLVER.WARMUP_ITERS
    assert (cfg.SOLVER.MAX_ITER, cfg.MODEL.MCCNN.DETECTOR_ITERS, cfg.TEST.EVAL_PERIOD) == (5400, 4400, 880)
    fit_schedule(cfg, 0.7)
    # 880 * 0.7 = 616; Ec's five evaluations end on its last step; the refiner's 1,000 -> 700.
    assert cfg.TEST.EVAL_PERIOD == cfg.SOLVER.CHECKPOINT_PERIOD == 616
    assert cfg.MODEL.MCCNN.DETECTOR_ITERS == 5 * 616
    assert cfg.SOLVER.MAX_ITER == 5 * 616 + 700
    assert cfg.SOLVER.WARMUP_ITERS == warmup


def test_steps_shrink_with_the_schedule_and_a_scale_above_one_is_refused():
    cfg = make_cfg("mssd_vgg16.yaml", {"SOLVER.MAX_ITER": 1000, "SOLVER.STEPS": "(600, 900)",
                                       "SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR"})  # fmt: skip
    fit_schedule(cfg, 0.5)
    assert cfg.SOLVER.MAX_ITER == 500 and tuple(cfg.SOLVER.STEPS) == (300, 450)
    with pytest.raises(ValueError, match="scale"):
        fit_schedule(cfg, 1.5)


@pytest.fixture
def budget_run(tmp_path, tool, tiny_opts, phantom_root):
    """``run(*opts, resume=False)``: train_net.py on the phantoms' MC-CNN config, 8 iterations
    (Ec's 4 then the refiner's 4), evaluated every 2, no evaluation set."""
    train_net = tool("train_net")
    out = tmp_path / "out"

    def run(*opts, resume=False):
        argv = ["--config-file", os.path.join(CONFIGS, "mccnn_synthetic.yaml")] + (["--resume"] if resume else [])
        argv += tiny_opts + [
            "DATASETS.TRAIN", "('synthetic_tiny',)", "DATASETS.TEST", "()",
            "SOLVER.MAX_ITER", "8", "MODEL.MCCNN.DETECTOR_ITERS", "4", "SOLVER.STEPS", "()",
            "SOLVER.WARMUP_ITERS", "0", "SOLVER.IMS_PER_BATCH", "2", "TEST.EVAL_PERIOD", "2",
            "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.TIME_BUDGET.CALIBRATION_ITERS", "2",
            "OUTPUT_DIR", str(out), *opts]  # fmt: skip
        train_net.run(argv)
        return out

    return run, train_net


def _iterations(out):
    """Steps trained, from the images seen (batch 2)."""
    lines = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    return max(line.get("progress/images_seen", 0) for line in lines) // 2


def test_train_net_shrinks_the_schedule_to_the_budget_and_resume_keeps_it(budget_run, monkeypatch):
    run, train_net = budget_run
    # 12.5 s per step timed, 15 s with the margin of 0.2: 8 steps take 2 minutes, twice the budget.
    monkeypatch.setattr(budget, "measure_seconds_per_iter", lambda trainer, cfg, iters: 12.5)
    out = run("SOLVER.TIME_BUDGET.MINUTES", "1", "SOLVER.TIME_BUDGET.MARGIN", "0.2")
    fit = json.loads((out / "time_budget.json").read_text())
    assert fit["scale"] == pytest.approx(0.5) and fit["predicted_minutes"] == 2
    saved = make_cfg(str(out / "config.yaml"))
    assert (saved.SOLVER.MAX_ITER, saved.MODEL.MCCNN.DETECTOR_ITERS, saved.TEST.EVAL_PERIOD) == (4, 2, 1)
    assert _iterations(out) == 4

    # --resume reuses the fit: no second timing, the same 4 iterations.
    monkeypatch.setattr(budget, "measure_seconds_per_iter", lambda *a: pytest.fail("timed again"))
    run("SOLVER.TIME_BUDGET.MINUTES", "1", "SOLVER.TIME_BUDGET.MARGIN", "0.2", resume=True)
    assert make_cfg(str(out / "config.yaml")).SOLVER.MAX_ITER == 4


def test_calibration_times_real_steps_and_a_fast_machine_keeps_the_schedule(budget_run):
    """The real timing (two steps after three unmeasured) against a budget no tiny model misses:
    the config's own 8 iterations."""
    run, _ = budget_run
    out = run("SOLVER.TIME_BUDGET.MINUTES", "60")
    fit = json.loads((out / "time_budget.json").read_text())
    assert 0 < fit["seconds_per_iter"] < 60 and fit["scale"] == 1.0
    assert _iterations(out) == 8
