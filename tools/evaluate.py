#!/usr/bin/env python
"""Evaluate a detector (config + weights) on a registered dataset or any COCO-format set.

Examples:
    python tools/evaluate.py --config-file configs/mccnn.yaml --weights model_final.pth \\
        --dataset tn5000_val --output output/eval_val
    python tools/evaluate.py --config-file configs/mccnn.yaml --weights model_final.pth \\
        --coco-json other/annotations.json --image-root other/images --output output/eval_other
    # a set whose boxes carry no diagnosis (one category): score detection of "a nodule"
    python tools/evaluate.py ... --class-agnostic

Runs detectron2's ``inference_on_dataset`` with the project's test mapper (resize to
INPUT.FIXED_SIZE), COCO box AP and thyroid_det's NoduleEvaluator. Writes to ``--output``:

* ``metrics.json``: flat ``"<task>.<metric>"`` keys (split at the first dot). ``bbox.*`` are
  COCOEvaluator's, in percent (bbox.AP, bbox.AP50, bbox.AP75, bbox.AP-malignant,
  bbox.AP50-malignant, ...);
  ``nodule.*`` are NoduleEvaluator's, as fractions (nodule.recall50, nodule.accuracy,
  nodule.sensitivity, nodule.specificity, nodule.auc, nodule.auc_ci_low, nodule.froc@1fp,
  nodule.auc-size_small, ...; see thyroid_det.evaluation.NoduleEvaluator).
  ``seconds_per_image`` is the model call alone (data loading and metrics excluded; the first
  call is warm-up and not counted; the GPU is synchronised), ``num_images`` the images run.
  Undefined values (NaN) are written as null.
* ``nodule_metrics.json``, ``nodules.csv``, ``roc.png``, ``froc.png`` (NoduleEvaluator),
  ``coco_instances_results.json`` (COCOEvaluator), ``config.yaml`` and ``log.txt``.
"""

import argparse
import hashlib
import logging
import math
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from tabulate import tabulate

import thyroid_det  # noqa: F401  (registers the plugin)
from thyroid_det.data.datasets import register_coco
from thyroid_det.engine import Trainer, load_inference_weights, setup_cfg_for_weights
from thyroid_det.evaluation import ModelTimer, build_evaluators, flat_metrics
from thyroid_det.utils.cli import cli_errors
from thyroid_det.utils.file_io import atomic_write_json

logger = logging.getLogger("thyroid_det.evaluate")

SUMMARY_KEYS = (
    "bbox.AP",
    "bbox.AP50",
    "bbox.AP50-benign",
    "bbox.AP50-malignant",
    "bbox.AP75",
    "nodule.recall50",
    "nodule.froc_cpm",
    "nodule.accuracy",
    "nodule.sensitivity",
    "nodule.specificity",
    "nodule.auc",
    "nodule.youden_threshold",
    "nodule.accuracy_youden",
    "nodule.sensitivity_youden",
    "nodule.specificity_youden",
    "nodule.auc_coarse",
    "nodule.auc_fine",
    "seconds_per_image",
)


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--weights", required=True, metavar="FILE", help="checkpoint to evaluate")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--dataset", metavar="NAME", help="a registered dataset, e.g. tn5000_val")
    data.add_argument(
        "--coco-json", metavar="FILE", help="COCO instances JSON (needs --image-root)"
    )
    parser.add_argument(
        "--image-root", metavar="DIR", help="folder the COCO file names are relative to"
    )
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument(
        "--class-agnostic",
        action="store_true",
        help="score detection of 'a nodule' (one merged category); skip benign/malignant metrics",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def fail(message):
    """Stop with a one-line message, no traceback."""
    raise SystemExit(f"evaluate.py: error: {message}")


def register_coco_json(json_file, image_root):
    """Register a COCO file under a name derived from its path; returns the name."""
    if not os.path.isfile(json_file):
        fail(f"COCO json {json_file!r} not found")
    if not image_root or not os.path.isdir(image_root):
        fail(f"--image-root {image_root!r} is not a folder (required with --coco-json)")
    digest = hashlib.sha1(os.path.abspath(json_file).encode()).hexdigest()[:8]
    stem = os.path.splitext(os.path.basename(json_file))[0]
    name = f"evaluate_{stem}_{digest}"
    if name not in DatasetCatalog.list():
        register_coco(name, json_file, image_root)
    return name


def check_dataset(name):
    """Load the dataset once, stopping with the file and the problem when it cannot be used."""
    if name not in DatasetCatalog.list():
        fail(
            f"dataset {name!r} is not registered "
            f"(registered: {', '.join(sorted(DatasetCatalog.list()))})"
        )
    try:
        records = DatasetCatalog.get(name)
    except Exception as e:  # a malformed file: name it and the cause, not a deep traceback
        source = MetadataCatalog.get(name).get("coco_json", name)
        fail(f"cannot load dataset {source!r}: {type(e).__name__}: {e}")
    if not records:
        fail(f"dataset {name!r} has no images")
    missing = [r["file_name"] for r in records if not os.path.isfile(r["file_name"])]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        fail(f"dataset {name!r} references a missing image: {missing[0]}{more}")
    return records


def format_summary(metrics):
    rows = []
    for key in SUMMARY_KEYS:
        if key not in metrics:
            continue
        value = metrics[key]
        text = (
            "nan"
            if math.isnan(value)
            else (f"{value:.2f}" if key.startswith("bbox.") else f"{value:.4f}")
        )
        if key == "nodule.auc" and "nodule.auc_ci_low" in metrics:
            text += f"  [{metrics['nodule.auc_ci_low']:.3f}, {metrics['nodule.auc_ci_high']:.3f}]"
        rows.append((key, text))
    return tabulate(rows, headers=["metric", "value"], tablefmt="pipe")


@cli_errors("evaluate.py")
def main(argv=None):
    args = build_parser().parse_args(argv)
    inputs = [args.coco_json, args.image_root] if args.coco_json else []
    cfg = setup_cfg_for_weights(args, "evaluate.py", inputs)

    name = args.dataset or register_coco_json(args.coco_json, args.image_root)
    records = check_dataset(name)
    class_agnostic = args.class_agnostic
    classes = MetadataCatalog.get(name).get("thing_classes", [])
    if len(classes) == 1 and not class_agnostic:
        logger.warning(f"{name!r} has one category ({classes[0]!r}): evaluating class-agnostically")
        class_agnostic = True
    if len(classes) == 2 and [c.lower() for c in classes] != ["benign", "malignant"]:
        logger.warning(
            f"{name!r} has classes {classes}; the models predict [benign, malignant] in that "
            "order, so per-class AP assumes the second class is malignant"
        )

    model = build_model(cfg)
    load_inference_weights(model, cfg.MODEL.WEIGHTS)
    timed = ModelTimer(model)
    evaluator = build_evaluators(cfg, name, args.output, class_agnostic=class_agnostic)
    results = inference_on_dataset(timed, Trainer.build_test_loader(cfg, name), evaluator)

    metrics = flat_metrics(results)
    metrics["seconds_per_image"] = timed.seconds_per_image
    metrics["num_images"] = float(len(records))
    atomic_write_json(os.path.join(args.output, "metrics.json"), dict(sorted(metrics.items())))
    if class_agnostic:
        logger.info(
            "class-agnostic: COCO AP over one merged category; benign/malignant metrics skipped"
        )
    print(f"Evaluation of {args.weights} on {name} ({len(records)} images)")
    print(format_summary(metrics))
    print(f"Written: {os.path.join(args.output, 'metrics.json')}")
    return metrics


if __name__ == "__main__":
    main()
