#!/usr/bin/env python
"""Draw the learning curves of one or more training runs into one PNG.

Examples:
    python tools/plot_curves.py output/mccnn_cpu --output curves.png
    python tools/plot_curves.py output/probes/A output/probes/B --labels "lr 1e-3" "lr 4e-3 cosine"

Each run is an OUTPUT_DIR (or its ``metrics.json``) written by ``tools/train_net.py``. The top
row plots the evaluations made during training (``TEST.EVAL_PERIOD``) against minutes of
training, the bottom row against images seen: AP50 over both classes, class-agnostic AP50 (a
nodule found, whatever its class), the benign/malignant ROC AUC on the found nodules, and the
training losses (median over each logging window). Minutes and images come from the
``progress/*`` scalars that thyroid_det's trainer logs every step; they exclude evaluation time.
"""

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from thyroid_det.utils.file_io import atomic_path  # noqa: E402

PANELS = (
    ("bbox/AP50", "AP50, benign + malignant (%)"),
    ("bbox_agnostic/AP50", "class-agnostic AP50 (%)"),
    ("nodule/auc", "benign/malignant AUC (found nodules)"),
    ("nodule/recall50", "nodule recall at IoU 0.5"),
)
LOSS_KEYS = ("loss_cls", "loss_box_reg")
X_AXES = (("progress/train_minutes", "training minutes"), ("progress/images_seen", "images seen"))


def read_metrics(path):
    """The rows of a detectron2 ``metrics.json`` (one JSON object per line), in file order.

    A resumed run appends rows for iterations it already logged; the later row wins.
    """
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.json")
    if not os.path.isfile(path):
        raise SystemExit(f"plot_curves.py: error: {path!r} not found")
    rows = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"plot_curves.py: error: {path}:{number} is not JSON ({e.msg})")
            rows.setdefault(row.get("iteration", -1), {}).update(row)
    return [rows[k] for k in sorted(rows)]


def series(rows, key, x_key):
    """(x, y) arrays of ``key`` against ``x_key``.

    Evaluation rows that lack the progress scalars (an evaluation logged at an iteration no
    training row has) get them by linear interpolation over the iteration number.
    """
    # Progress logged after iteration i covers i + 1 steps: "iteration -1" is the start.
    known = [(-1, 0.0)] + [(r["iteration"], r[x_key]) for r in rows if x_key in r]
    points = [(r["iteration"], r[key]) for r in rows if key in r and np.isfinite(r[key])]
    if len(known) == 1 or not points:
        return np.array([]), np.array([])
    iters, xs = np.array(known, dtype=float).T
    at, ys = np.array(points, dtype=float).T
    return np.interp(at, iters, xs), ys


def plot_runs(runs, labels, output, title=None):
    """Draw every run's curves into ``output`` (PNG, written atomically)."""
    columns = len(PANELS) + 1
    fig, axes = plt.subplots(len(X_AXES), columns, figsize=(4.2 * columns, 3.4 * len(X_AXES)))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row_axes, (x_key, x_label) in zip(axes, X_AXES):
        for i, (rows, label) in enumerate(zip(runs, labels)):
            colour = colours[i % len(colours)]
            for ax, (key, _) in zip(row_axes, PANELS):
                ax.plot(*series(rows, key, x_key), "o-", ms=3, color=colour, label=label)
            for loss_key, style in zip(LOSS_KEYS, ("-", ":")):
                row_axes[-1].plot(*series(rows, loss_key, x_key), style, lw=1, color=colour,
                                  label=f"{label}: {loss_key}")
        for ax, (_, name) in zip(row_axes, PANELS + (("", "training losses (log)"),)):
            ax.set_xlabel(x_label)
            if x_key == "progress/images_seen":
                ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:g}k")
            ax.set_title(name, fontsize=10)
            ax.grid(alpha=0.3)
        row_axes[-1].set_yscale("log")
    axes[0][0].legend(fontsize=8)
    axes[0][-1].legend(fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="OUTPUT_DIRs of training runs, or metrics.json files")
    parser.add_argument("--labels", nargs="+", help="one legend label per run (default: its folder)")
    parser.add_argument("--output", default="learning_curves.png", help="PNG to write")
    parser.add_argument("--title", help="figure title")
    args = parser.parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.normpath(r.replace("metrics.json", "")))
                             for r in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(args.runs)} runs but {len(labels)} labels")
    runs = [read_metrics(r) for r in args.runs]
    plot_runs(runs, labels, args.output, args.title)
    print(f"Written: {args.output}")


if __name__ == "__main__":
    sys.exit(main())
