"""scripts/plan_device_run.py: the schedule a time-boxed GPU run gets from its calibration."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "plan_device_run.py")


def _calibration(tmp_path, ec=0.25, refiner=0.5):
    """A calibration run's metrics.json (60 Ec + 20 refiner iterations) and log: start-up 12 s,
    an evaluation from 12:00:40 to 12:01:10 (30 s)."""
    rows = [{"iteration": 19, "time": 3.0}]  # the first window: cuDNN, warm-up; left out
    rows += [{"iteration": 39, "time": ec}, {"iteration": 59, "time": ec * 1.2}]
    rows += [{"iteration": 79, "time": refiner}, {"iteration": 80, "bbox/AP50": 1.0}]
    (tmp_path / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = tmp_path / "calibration.log"
    log.write_text(
        "[11/30 12:00:00 d2.engine.defaults]: Rank of current process: 0\n"
        "[11/30 12:00:12 d2.engine.train_loop]: Starting training from iteration 0\n"
        "not a logger line\n"
        "[11/30 12:00:40 d2.evaluation.evaluator]: Start inference on 496 batches\n"
        "[11/30 12:01:10 d2.evaluation.testing]: copypaste: 1.0,2.0\n"
    )
    return str(tmp_path), str(log)


def _plan(run_dir, log, *args):
    out = subprocess.run(
        [sys.executable, SCRIPT, run_dir, log, "--smoke-detector-iters", "60", *args],
        capture_output=True, text=True,
    )
    return out


def test_plan_fits_the_budget(tmp_path):
    run_dir, log = _calibration(tmp_path)
    out = _plan(run_dir, log, "--seconds", "400", "--output", str(tmp_path / "plan.json"))
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    opts = dict(zip(words[::2], words[1::2]))
    plan = json.loads((tmp_path / "plan.json").read_text())
    # Ec's median over its windows after the first: 0.25 and 0.30 -> the upper median 0.30.
    assert plan["ec_s_per_iter"] == pytest.approx(0.30)
    assert plan["refiner_s_per_iter"] == pytest.approx(0.5)
    assert plan["startup_s"] == 12 and plan["eval_s"] == 30
    # 400 - 12 start-up - 5 x 30 evaluations - 30 margin = 208 s at 0.88 x 0.3 + 0.12 x 0.5 s/it.
    max_iter = int(opts["SOLVER.MAX_ITER"])
    assert max_iter == int(208 / (0.88 * 0.30 + 0.12 * 0.5)) // 40 * 40
    detector = int(opts["MODEL.MCCNN.DETECTOR_ITERS"])
    assert detector % 4 == 0 and abs(detector - 0.88 * max_iter) <= 2
    assert int(opts["TEST.EVAL_PERIOD"]) == detector // 4 == int(opts["SOLVER.CHECKPOINT_PERIOD"])
    assert plan["train_s_planned"] <= 208


def test_plan_refuses_a_budget_too_short(tmp_path):
    run_dir, log = _calibration(tmp_path)
    out = _plan(run_dir, log, "--seconds", "200")
    assert out.returncode != 0 and "too short" in out.stderr


def test_plan_names_a_log_without_evaluation(tmp_path):
    run_dir, log = _calibration(tmp_path)
    with open(log) as f:
        lines = [line for line in f if "Start inference" not in line]
    with open(log, "w") as f:
        f.writelines(lines)
    out = _plan(run_dir, log, "--seconds", "400")
    assert out.returncode != 0 and "calibration.log" in out.stderr
