#!/usr/bin/env python
"""Size a time-boxed GPU run from a short calibration run of the same config.

    python scripts/plan_device_run.py SMOKE_DIR SMOKE_LOG --seconds 380 [--detector-fraction 0.88]

SMOKE_DIR holds the calibration run's ``metrics.json``, SMOKE_LOG its log (detectron2's logger,
timestamps to the second). From them: seconds per iteration in Ec's stage and in the refiner's
(the ``time`` medians detectron2 writes every 20 iterations, the first window left out: it holds
cuDNN's autotuning), the start-up cost (from ``--launched``, or the log's first line, to the
first iteration) and the cost of one evaluation (the final one). Prints, as ``KEY VALUE``
config overrides, the longest schedule whose training, start-up, four evaluations in Ec's
stage, one at the end and checkpoints fit in ``--seconds``: SOLVER.MAX_ITER,
MODEL.MCCNN.DETECTOR_ITERS (the same fraction of MAX_ITER as in the config), TEST.EVAL_PERIOD
and SOLVER.CHECKPOINT_PERIOD (a quarter of Ec's stage). The measurements go to stderr, and with
``--output`` to a JSON file.
"""
import argparse
import datetime
import json
import os
import re
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = re.compile(r"^\[(\d\d/\d\d \d\d:\d\d:\d\d)")


# thyroid_det's atomic JSON writer, run from its file (it needs only the standard library):
# importing thyroid_det would import detectron2 and torch, seconds of a device run's time box.
atomic_write_json = runpy.run_path(os.path.join(REPO, "thyroid_det", "utils", "file_io.py"))[
    "atomic_write_json"
]


def log_times(path, year):
    """(first, train_start, eval_start, last): timestamps of the log's first line, of the first
    iteration, of the last "Start inference" and of the last line, in seconds."""
    first = train = evaluation = last = None
    with open(path, errors="replace") as f:
        for line in f:
            m = STAMP.match(line)
            if not m:
                continue
            t = datetime.datetime.strptime(f"{year}/{m.group(1)}", "%Y/%m/%d %H:%M:%S").timestamp()
            first = t if first is None else first
            last = t
            if "Starting training from iteration" in line:
                train = t
            elif "Start inference on" in line:
                evaluation = t
    if None in (first, train, evaluation):
        sys.exit(f"{path}: no training start or no evaluation in the calibration log")
    return first, train, evaluation, last


def step_times(metrics, detector_iters):
    """Median seconds per iteration in each stage, from metrics.json rows written every 20
    iterations (each a median over its window); the first window of each stage is skipped."""
    ec, ref = [], []
    with open(metrics) as f:
        for line in f:
            row = json.loads(line)
            if "time" not in row:
                continue
            it = row["iteration"]
            if 39 <= it < detector_iters:  # a window of 20 iterations ending at `it`
                ec.append(row["time"])
            elif it - 19 >= detector_iters:
                ref.append(row["time"])
    if not ec or not ref:
        sys.exit(f"{metrics}: too few iterations to time both stages")
    return sorted(ec)[len(ec) // 2], sorted(ref)[len(ref) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("smoke_dir")
    parser.add_argument("smoke_log")
    parser.add_argument("--seconds", type=float, required=True, help="the whole run's budget")
    parser.add_argument("--detector-fraction", type=float, default=0.88)
    parser.add_argument("--smoke-detector-iters", type=int, required=True)
    parser.add_argument("--evaluations", type=int, default=5)
    parser.add_argument("--margin", type=float, default=30.0, help="checkpoints, stage change")
    parser.add_argument("--max-iter-cap", type=int, default=20000)
    parser.add_argument("--min-iter", type=int, default=200, help="below this, refuse")
    parser.add_argument("--launched", type=float, default=None,
                        help="epoch seconds at the calibration's launch (default: its first line)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    first, train, evaluation, last = log_times(args.smoke_log, datetime.date.today().year)
    ec, ref = step_times(f"{args.smoke_dir}/metrics.json", args.smoke_detector_iters)
    launched = first if args.launched is None else min(args.launched, first)
    startup, eval_s = train - launched, max(last - evaluation, 1.0)
    per_iter = args.detector_fraction * ec + (1 - args.detector_fraction) * ref
    left = args.seconds - startup - args.evaluations * eval_s - args.margin
    max_iter = min(int(left / per_iter) // 40 * 40, args.max_iter_cap)
    if max_iter < args.min_iter:
        sys.exit(f"only {left:.0f}s for training at {per_iter:.3f}s/it: too short to be worth it")
    detector = int(round(args.detector_fraction * max_iter / 4)) * 4
    plan = {
        "ec_s_per_iter": ec, "refiner_s_per_iter": ref, "startup_s": startup,
        "eval_s": eval_s, "budget_s": args.seconds, "train_s_planned": max_iter * per_iter,
        "SOLVER.MAX_ITER": max_iter, "MODEL.MCCNN.DETECTOR_ITERS": detector,
        "TEST.EVAL_PERIOD": detector // 4, "SOLVER.CHECKPOINT_PERIOD": detector // 4,
    }
    print(json.dumps(plan), file=sys.stderr)
    if args.output:
        atomic_write_json(args.output, plan)
    print(" ".join(f"{k} {v}" for k, v in plan.items() if "." in k))


if __name__ == "__main__":
    main()
