#!/usr/bin/env python
"""Fit temperature scaling of the malignant probability on a validation set; store it with the
model.

Example:
    python tools/fit_temperature.py --config-file configs/mccnn.yaml \\
        --weights output/mccnn/model_final.pth --dataset tn5000_val --output output/temperature

Runs tools/evaluate.py on the set (into ``OUTPUT/before``; ``--from-run DIR`` reuses an earlier
run of the same weights instead), fits the temperature T that minimises the negative
log-likelihood of the found nodules' diagnoses under sigmoid(logit(p) / T), and writes:

* ``OUTPUT/model_temperature.pth`` (or ``--save-weights``): the checkpoint with the entry
  ``"malignancy_temperature"``, which tools/predict.py, tools/evaluate.py and
  thyroid_det.engine.Predictor apply (``MODEL.MALIGNANCY_TEMPERATURE`` > 0 overrides it);
* ``OUTPUT/temperature.json``: T, and ECE / Brier / negative log-likelihood before and after on
  the fitting set (after is in-sample: evaluate another set for an honest figure), in
  ``TEST.NODULE_EVAL.CALIBRATION_BINS`` bins as the evaluator counts them;
* ``OUTPUT/reliability_temperature.png``: the reliability diagram before and after.

Fitting on top of a checkpoint that already has a temperature multiplies the two. The new
checkpoint is never written over ``--weights``.
"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluate  # noqa: E402  (tools/evaluate.py)

from thyroid_det.engine import load_cfg  # noqa: E402
from thyroid_det.engine.checkpoint import read_checkpoint  # noqa: E402
from thyroid_det.evaluation.calibration import (  # noqa: E402
    apply_temperature,
    calibration_metrics,
    fit_temperature,
    reliability_curve,
)
from thyroid_det.evaluation.operating_points import labelled_probabilities  # noqa: E402
from thyroid_det.evaluation.plots import plot_reliability_diagram  # noqa: E402
from thyroid_det.modeling.temperature import TEMPERATURE_KEY  # noqa: E402
from thyroid_det.utils.cli import (  # noqa: E402
    check_output_file,
    cli_errors,
    config_tool_parser,
)
from thyroid_det.utils.file_io import atomic_path, atomic_write_json  # noqa: E402


def build_parser():
    parser = config_tool_parser(__doc__)
    parser.add_argument("--weights", required=True, metavar="FILE", help="a .pth checkpoint")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--dataset", metavar="NAME", help="the validation set, e.g. tn5000_val")
    data.add_argument("--from-run", metavar="DIR", help="an evaluate.py run of --weights")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument("--save-weights", metavar="FILE", help="default OUTPUT/model_temperature.pth")
    return parser


def nll(y, p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


@cli_errors("fit_temperature.py")
def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.weights.endswith(".pth") or not os.path.isfile(args.weights):
        raise SystemExit(f"fit_temperature.py: error: {args.weights!r} is not a .pth checkpoint")
    save = args.save_weights or os.path.join(args.output, "model_temperature.pth")
    flag = "--save-weights" if args.save_weights else "the default --save-weights"
    check_output_file(save, [args.weights], flag)
    checkpoint = read_checkpoint(args.weights)
    bins = load_cfg(args).TEST.NODULE_EVAL.CALIBRATION_BINS
    run = args.from_run
    if run is None:
        run = os.path.join(args.output, "before")
        evaluate.main(
            ["--config-file", args.config_file, "--weights", args.weights, "--dataset",
             args.dataset, "--output", run] + list(args.opts)
        )
    y, p, source = labelled_probabilities(run)
    y = y.astype(int)
    try:
        fitted = fit_temperature(y, p)
    except ValueError as e:
        raise SystemExit(f"fit_temperature.py: error: {source}: {e}") from None
    previous = float(checkpoint.get(TEMPERATURE_KEY) or 1.0)
    calibrated = apply_temperature(p, fitted)
    summary = {
        "malignancy_temperature": previous * fitted,
        "fitted_on": source,
        "num_nodules": int(len(y)),
        "num_malignant": int(y.sum()),
        "previous_temperature": previous,
        "before": dict(calibration_metrics(y, p, bins), nll=nll(y, p)),
        "after": dict(calibration_metrics(y, calibrated, bins), nll=nll(y, calibrated)),
        "note": "after is measured on the set the temperature was fitted on (in-sample)",
    }
    checkpoint[TEMPERATURE_KEY] = summary["malignancy_temperature"]
    with atomic_path(save) as tmp:
        torch.save(checkpoint, tmp)
    atomic_write_json(os.path.join(args.output, "temperature.json"), summary)
    b, a = summary["before"], summary["after"]
    plot_reliability_diagram(
        [
            (f"before (ECE {b['ece']:.3f}, Brier {b['brier']:.3f})", *reliability_curve(y, p, bins)),
            (
                f"T = {fitted:.2f} (ECE {a['ece']:.3f}, Brier {a['brier']:.3f})",
                *reliability_curve(y, calibrated, bins),
            ),
        ],
        os.path.join(args.output, "reliability_temperature.png"),
        title=f"Temperature scaling on {args.dataset or run}",
    )
    print(
        f"temperature {summary['malignancy_temperature']:.4f} (fitted {fitted:.4f} on {len(y)} "
        f"found nodules); ECE {b['ece']:.4f} -> {a['ece']:.4f}, Brier {b['brier']:.4f} -> "
        f"{a['brier']:.4f}\nWritten: {save}"
    )
    return summary


if __name__ == "__main__":
    main()
