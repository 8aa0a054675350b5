#!/usr/bin/env python
"""Summarise a training run's evaluations from its ``metrics.json``: a table on stdout and a
small JSON (every evaluation's headline metrics, whether the run reached SOLVER.MAX_ITER).

    python scripts/summarize_run.py output/mccnn --output summary.json

Used by ``scripts/device_run_mccnn.sh`` to bring back, in one small file, what a GPU run
measured, also when its time box cut it short (then the last row is the last periodic
evaluation, ``TEST.EVAL_PERIOD``). SOLVER.MAX_ITER comes from the run's ``config.yaml``
(or ``--max-iter``).
"""
import argparse
import json
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADLINE = (
    "bbox/AP",
    "bbox/AP50",
    "bbox/AP50-benign",
    "bbox/AP50-malignant",
    "bbox_agnostic/AP50",
    "nodule/recall50",
    "nodule/accuracy",
    "nodule/sensitivity",
    "nodule/specificity",
    "nodule/auc",
    "nodule/auc_ci_low",
    "nodule/auc_ci_high",
    "nodule/num_nodules",
)
PROGRESS = ("iteration", "progress/images_seen", "progress/train_minutes")


# thyroid_det's atomic JSON writer, run from its file (it needs only the standard library):
# importing thyroid_det would import detectron2 and torch, seconds of a device run's time box.
atomic_write_json = runpy.run_path(os.path.join(REPO, "thyroid_det", "utils", "file_io.py"))[
    "atomic_write_json"
]


def read_rows(path):
    """metrics.json's rows (one JSON object a line) merged by iteration, the later row winning
    (as tools/plot_curves.py reads them); a line cut by a killed writer is skipped."""
    rows = {}
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows.setdefault(row.get("iteration", -1), {}).update(row)
    return [rows[k] for k in sorted(rows)]


def interpolate(rows, key, iteration):
    """``key`` at ``iteration`` from the rows that have it, linear in the iteration number
    (an evaluation logged between two writes of the progress scalars lacks them)."""
    known = [(-1, 0.0)] + [(r["iteration"], r[key]) for r in rows if key in r and "iteration" in r]
    for (i0, v0), (i1, v1) in zip(known, known[1:]):
        if i0 <= iteration <= i1:
            return v0 if i1 == i0 else v0 + (v1 - v0) * (iteration - i0) / (i1 - i0)
    return None


def summarize(rows, max_iter=None):
    """The evaluations (rows with ``bbox/AP50``) and how far training got."""
    evals = []
    for row in rows:
        if "bbox/AP50" not in row:
            continue
        summary_row = {k: row[k] for k in PROGRESS + HEADLINE if k in row}
        for key in PROGRESS[1:]:
            if key not in summary_row and "iteration" in row:
                summary_row[key] = interpolate(rows, key, row["iteration"])
        evals.append(summary_row)
    last = max((row.get("iteration", -1) for row in rows), default=-1)
    minutes = max((row.get("progress/train_minutes", 0.0) for row in rows), default=0.0)
    return {
        "last_iteration": last,
        "max_iter": max_iter,
        # The final evaluation is logged at iteration MAX_ITER - 1 or MAX_ITER.
        "completed": max_iter is not None
        and bool(evals)
        and evals[-1].get("iteration", -1) >= max_iter - 1,
        "train_minutes": round(minutes, 2),
        "evaluations": evals,
    }


def max_iter_of(run_dir):
    """SOLVER.MAX_ITER from the ``config.yaml`` detectron2 writes into OUTPUT_DIR, or None."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    import yaml

    with open(path) as f:
        return int(yaml.safe_load(f)["SOLVER"]["MAX_ITER"])


def table(summary):
    cols = ("iteration", "progress/images_seen", "progress/train_minutes", "bbox/AP50",
            "bbox_agnostic/AP50", "nodule/recall50", "nodule/auc")
    heads = ("iter", "images", "train min", "AP50", "agnostic AP50", "recall50", "AUC")
    lines = ["  ".join(f"{h:>13}" for h in heads)]
    for row in summary["evaluations"]:
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append(f"{v:>13.3f}" if isinstance(v, float) else f"{v!s:>13}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a training OUTPUT_DIR or its metrics.json")
    parser.add_argument(
        "--max-iter",
        type=int,
        help="SOLVER.MAX_ITER, which tells a finished run from a cut one (default: config.yaml's)",
    )
    parser.add_argument("--output", help="write the summary JSON here")
    args = parser.parse_args(argv)
    path = os.path.join(args.run, "metrics.json") if os.path.isdir(args.run) else args.run
    if not os.path.isfile(path):
        sys.exit(f"summarize_run.py: error: no metrics.json at {path}")
    max_iter = args.max_iter or max_iter_of(os.path.dirname(path) or ".")
    summary = summarize(read_rows(path), max_iter)
    print(table(summary))
    print(
        f"last iteration {summary['last_iteration']} of {max_iter}, "
        f"{summary['train_minutes']:.1f} training minutes, "
        + ("completed" if summary["completed"] else "NOT completed (cut short or failed)")
    )
    if args.output:
        atomic_write_json(args.output, summary)
    return summary


if __name__ == "__main__":
    main()
