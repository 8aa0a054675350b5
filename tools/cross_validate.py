#!/usr/bin/env python
"""K-fold cross-validation in one command: train and evaluate each fold, report mean +- std.

Examples:
    python tools/cross_validate.py --config-file configs/mccnn.yaml --dataset tn5000_trainval
    python tools/cross_validate.py --config-file configs/mccnn.yaml --folds 5 --resume \\
        OUTPUT_DIR output/mccnn_cv

The folds are thyroid_det's stratified k-fold split (thyroid_det.data.datasets.kfold_splits:
each image is one unit, strata by "holds a malignant nodule", fixed by --seed), registered as
``<dataset>_fold<i>_train`` / ``_val``. Fold i trains thyroid_det's Trainer from the config
on the other folds' images and evaluates on its own (COCO AP + nodule metrics), in
``OUTPUT_DIR/fold_<i>``: its checkpoints, ``inference/``, training's ``metrics.json`` (the
learning curves, tools/plot_curves.py) and, once the fold is done, ``fold_metrics.json`` (its
flat evaluation metrics). With ``--resume`` a fold whose ``fold_metrics.json`` exists is not
rerun and an unfinished one resumes from its last checkpoint.

Writes ``OUTPUT_DIR/cv_metrics.json``: ``per_fold`` (each fold's flat metrics, keys as in
tools/evaluate.py's metrics.json), and per metric ``mean``, ``std`` (sample standard deviation,
ddof=1, over the folds where it is defined) and ``n`` (that number of folds).
"""

import gc
import json
import math
import os

import detectron2.utils.comm as comm
import numpy as np
from tabulate import tabulate

import thyroid_det  # noqa: F401  (registers the plugin)
from thyroid_det.data.datasets import register_kfold_datasets
from thyroid_det.engine import Trainer, launch, setup_cfg
from thyroid_det.evaluation import FOLD_SUMMARY_KEYS, flat_metrics
from thyroid_det.utils.cli import check_dataset, cli_errors, config_tool_parser
from thyroid_det.utils.file_io import atomic_write_json

# A fold's evaluation, written when the fold is done: its "done" mark for --resume. Not
# metrics.json, which detectron2's JSONWriter appends training's lines to in the same folder.
FOLD_METRICS = "fold_metrics.json"


def build_parser():
    parser = config_tool_parser(__doc__)
    parser.add_argument(
        "--dataset", help="registered dataset to split (default: the config's DATASETS.TRAIN[0])"
    )
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold assignment")
    parser.add_argument(
        "--resume", action="store_true", help="keep finished folds, resume unfinished ones"
    )
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--dist-url", default="auto")
    return parser


def summarise(per_fold):
    """Mean, sample std and count of each metric over the folds where it is a finite number."""
    keys = sorted({k for fold in per_fold for k in fold})
    mean, std, count = {}, {}, {}
    for key in keys:
        values = np.array(
            [f[key] for f in per_fold if f.get(key) is not None and math.isfinite(f[key])]
        )
        count[key] = len(values)
        mean[key] = float(values.mean()) if len(values) else float("nan")
        std[key] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
    return mean, std, count


def format_table(per_fold, mean, std):
    keys = [k for k in FOLD_SUMMARY_KEYS if k in mean]
    rows = []
    for i, fold in enumerate(per_fold):
        rows.append([f"fold {i}"] + [_fmt(fold.get(k)) for k in keys])
    rows.append(["mean +- std"] + [f"{_fmt(mean[k])} +- {_fmt(std[k])}" for k in keys])
    return tabulate(rows, headers=[""] + keys, tablefmt="pipe")


def _fmt(value):
    return "nan" if value is None or not math.isfinite(value) else f"{value:.3f}"


def fold_config(cfg, train_name, val_name, output_dir):
    fold_cfg = cfg.clone()
    fold_cfg.defrost()
    fold_cfg.DATASETS.TRAIN = (train_name,)
    fold_cfg.DATASETS.TEST = (val_name,)
    fold_cfg.OUTPUT_DIR = output_dir
    fold_cfg.freeze()
    return fold_cfg


def run_fold(cfg, resume):
    """Train and evaluate one fold; returns its flat metrics (main process) or None."""
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    # DefaultTrainer's final evaluation hook leaves its results here; evaluate again otherwise.
    results = trainer.last_eval_results or Trainer.test(cfg, trainer.model)
    del trainer
    gc.collect()
    return flat_metrics(results) if comm.is_main_process() else None


def main(args):
    cfg = setup_cfg(args)
    dataset = args.dataset or (cfg.DATASETS.TRAIN[0] if len(cfg.DATASETS.TRAIN) == 1 else None)
    if dataset is None:
        raise SystemExit(
            "cross_validate.py: error: pass --dataset (the config trains on several sets)"
        )
    check_dataset(dataset)
    pairs = register_kfold_datasets(dataset, k=args.folds, seed=args.seed)

    per_fold = []
    for i, (train_name, val_name) in enumerate(pairs):
        fold_dir = os.path.join(cfg.OUTPUT_DIR, f"fold_{i}")
        metrics_path = os.path.join(fold_dir, FOLD_METRICS)
        if args.resume and os.path.isfile(metrics_path):
            with open(metrics_path) as f:
                per_fold.append(json.load(f))
            continue
        metrics = run_fold(fold_config(cfg, train_name, val_name, fold_dir), resume=args.resume)
        if comm.is_main_process():
            atomic_write_json(metrics_path, dict(sorted(metrics.items())))
            per_fold.append(metrics)
        comm.synchronize()

    if not comm.is_main_process():
        return None
    per_fold = [
        {k: (float("nan") if v is None else v) for k, v in fold.items()} for fold in per_fold
    ]
    mean, std, count = summarise(per_fold)
    summary = {
        "dataset": dataset,
        "folds": args.folds,
        "seed": args.seed,
        "per_fold": per_fold,
        "mean": mean,
        "std": std,
        "n": count,
    }
    path = os.path.join(cfg.OUTPUT_DIR, "cv_metrics.json")
    atomic_write_json(path, summary)
    print(f"{args.folds}-fold cross-validation of {args.config_file} on {dataset}")
    print(format_table(per_fold, mean, std))
    print(f"Written: {path}")
    return summary


@cli_errors("cross_validate.py")
def cli(argv=None):
    args = build_parser().parse_args(argv)
    args.eval_only = False
    if args.num_gpus <= 1:
        return main(args)
    return launch(main, args.num_gpus, dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    cli()
