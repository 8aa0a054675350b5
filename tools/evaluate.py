#!/usr/bin/env python
"""Evaluate a detector (config + weights) on a registered dataset or any COCO-format set.

Examples:
    python tools/evaluate.py --config-file configs/mccnn.yaml --weights model_final.pth \\
        --dataset tn5000_val --output output/eval_val
    python tools/evaluate.py --config-file configs/mccnn.yaml --weights model_final.pth \\
        --coco-json other/annotations.json --image-root other/images --output output/eval_other
    # a set whose boxes carry no diagnosis (one category): score detection of "a nodule"
    python tools/evaluate.py ... --class-agnostic
    # a threshold fixed on a validation run, applied to another set
    python tools/evaluate.py ... --dataset tn5000_val --output output/eval_val
    python tools/evaluate.py ... --dataset tn5000_test --output output/eval_test \
        --threshold-from output/eval_val --target "sensitivity>=0.95"
    # image-level labels (CSV: image,label with label benign/malignant or 0/1), no boxes
    python tools/evaluate.py ... --image-labels external/labels.csv --output output/eval_ext

Runs detectron2's ``inference_on_dataset`` with the project's test mapper (resize to
INPUT.FIXED_SIZE), COCO box AP and thyroid_det's NoduleEvaluator. Writes to ``--output``:

* ``metrics.json``: flat ``"<task>.<metric>"`` keys (split at the first dot). ``bbox.*`` are
  COCOEvaluator's, in percent (bbox.AP, bbox.AP50, bbox.AP75, bbox.AP-malignant,
  bbox.AP50-malignant, ...);
  ``nodule.*`` are NoduleEvaluator's, as fractions (nodule.recall50, nodule.accuracy,
  nodule.sensitivity, nodule.specificity, nodule.auc, nodule.auc_ci_low, nodule.froc@1fp,
  nodule.auc-size_small, ...; see thyroid_det.evaluation.NoduleEvaluator).
  ``seconds_per_image`` is the model call alone (data loading and metrics excluded; the first
  call is warm-up and not counted; the GPU is synchronised), per image of calls of
  ``images_per_batch`` images (``TEST.IMS_PER_BATCH``, 1 by default as in detectron2 and the
  papers), ``num_images`` the images run.
  Undefined values (NaN) are written as null.
* ``nodule_metrics.json``, ``nodules.csv``, ``roc.png``, ``reliability.png``, ``froc.png``
  (NoduleEvaluator), ``coco_instances_results.json`` (COCOEvaluator), ``config.yaml``, ``log.txt``.

COCO sets may list DICOM files (an image entry's optional ``"frame"`` picks a cine frame); their
calibration makes the size groups millimetres. The malignant probability is temperature-scaled
when the checkpoint or ``MODEL.MALIGNANCY_TEMPERATURE`` says so (tools/fit_temperature.py).

Operating points: ``--threshold T`` or ``--threshold-from RUN --target "sensitivity>=0.95"``
(the threshold meeting the target on the found nodules of an earlier evaluate.py run, e.g. on
the validation set) fixes ``TEST.NODULE_EVAL.FIXED_THRESHOLD``; ``nodule.sensitivity_fixed``,
``nodule.specificity_fixed`` and ``nodule.accuracy_fixed`` then come with bootstrap 95% intervals.

``--image-labels CSV`` scores a set labelled per image (columns ``image``, ``label``; paths
relative to ``--image-root`` or the CSV's folder; images or DICOM): an image's malignancy is its
most suspicious detection with score >= ``--min-score``; accuracy, sensitivity and specificity
at 0.5 (or the fixed threshold) and ROC AUC with bootstrap 95% intervals over the images with a
detection. Images with none are counted and listed. Writes ``image_metrics.json`` and
``images.csv``.
"""

import hashlib
import logging
import math
import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from tabulate import tabulate

import thyroid_det  # noqa: F401  (registers the plugin)
from thyroid_det.engine import Predictor, Trainer, load_inference_weights, setup_cfg_for_weights
from thyroid_det.evaluation import ModelTimer, build_evaluators, flat_metrics, format_summary
from thyroid_det.evaluation.image_level import (
    image_level_metrics,
    images_csv,
    read_image_labels,
    score_images,
)
from thyroid_det.evaluation.operating_points import labelled_probabilities, threshold_for_target
from thyroid_det.modeling.temperature import (
    attach_malignancy_temperature,
    resolve_malignancy_temperature,
)
from thyroid_det.utils.cli import check_dataset, cli_errors, config_tool_parser
from thyroid_det.utils.file_io import atomic_write_json, atomic_write_text

logger = logging.getLogger("thyroid_det.evaluate")

def build_parser():
    parser = config_tool_parser(__doc__)
    parser.add_argument("--weights", required=True, metavar="FILE", help="checkpoint to evaluate")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--dataset", metavar="NAME", help="a registered dataset, e.g. tn5000_val")
    data.add_argument(
        "--coco-json", metavar="FILE", help="COCO instances JSON (needs --image-root)"
    )
    data.add_argument(
        "--image-labels", metavar="CSV", help="a set labelled per image: columns image,label"
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
    fixed = parser.add_mutually_exclusive_group()
    fixed.add_argument("--threshold", type=float, metavar="T", help="a fixed malignant threshold")
    fixed.add_argument(
        "--threshold-from", metavar="RUN", help="an earlier evaluate.py output folder"
    )
    parser.add_argument(
        "--target",
        default="sensitivity>=0.95",
        help="what --threshold-from fixes: 'sensitivity>=X', 'specificity>=X' or 'youden'",
    )
    parser.add_argument(
        "--min-score", type=float, default=0.3, help="--image-labels: detections counted"
    )
    return parser


def fail(message):
    """Stop with a one-line message, no traceback."""
    raise SystemExit(f"evaluate.py: error: {message}")


def coco_dataset_opts(json_file, image_root):
    """The name a COCO file is evaluated under (derived from its path) and the config overrides
    that register it through DATASETS.COCO_REGISTER, as training does."""
    if not os.path.isfile(json_file):
        fail(f"COCO json {json_file!r} not found")
    if not image_root or not os.path.isdir(image_root):
        fail(f"--image-root {image_root!r} is not a folder (required with --coco-json)")
    digest = hashlib.sha1(os.path.abspath(json_file).encode()).hexdigest()[:8]
    stem = os.path.splitext(os.path.basename(json_file))[0]
    name = f"evaluate_{stem}_{digest}"
    return name, ["DATASETS.COCO_REGISTER", repr([[name, json_file, image_root]])]


def fixed_threshold(args):
    """The threshold --threshold or --threshold-from/--target fixes, or None."""
    if args.threshold is not None:
        return args.threshold
    if not args.threshold_from:
        return None
    try:
        y_true, y_prob, source = labelled_probabilities(args.threshold_from)
        threshold = threshold_for_target(y_true, y_prob, args.target)
    except (OSError, ValueError) as e:
        fail(str(e))
    if math.isnan(threshold):
        fail(f"{source}: both benign and malignant found nodules are needed to fix a threshold")
    print(f"Threshold {threshold:.4f}: {args.target} on {source} ({len(y_true)} labelled)")
    return threshold


def evaluate_image_labels(args, cfg, threshold):
    """--image-labels: per-image malignancy from the most suspicious detection."""
    try:
        items = read_image_labels(args.image_labels, args.image_root)
    except (OSError, ValueError) as e:
        fail(str(e))
    results = score_images(Predictor(cfg), items, min_score=args.min_score)
    metrics = image_level_metrics(
        results,
        threshold=0.5 if threshold is None else threshold,
        num_resamples=cfg.TEST.NODULE_EVAL.BOOTSTRAP,
        seed=max(cfg.SEED, 0),
    )
    atomic_write_json(os.path.join(args.output, "image_metrics.json"), metrics)
    atomic_write_text(os.path.join(args.output, "images.csv"), images_csv(results))
    print(f"Image-level evaluation of {args.weights} on {args.image_labels} ({len(items)} images)")
    rows = []
    for key in ("auc", "accuracy", "sensitivity", "specificity"):
        low, high = metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"]
        rows.append((key, f"{metrics[key]:.4f}  [{low:.3f}, {high:.3f}]"))
    rows += [(k, metrics[k]) for k in ("threshold", "num_scored", "num_no_detection")]
    print(tabulate(rows, headers=["metric", "value"], tablefmt="pipe"))
    for path in metrics["no_detection"]:
        print(f"  no detection: {path}")
    for path, error in metrics["unreadable"].items():
        print(f"  unreadable: {path}: {error}")
    print(f"Written: {os.path.join(args.output, 'image_metrics.json')}")
    return metrics


@cli_errors("evaluate.py")
def main(argv=None):
    args = build_parser().parse_args(argv)
    inputs = [p for p in (args.coco_json, args.image_root, args.image_labels) if p]
    threshold = fixed_threshold(args)
    if threshold is not None:
        args.opts = list(args.opts) + ["TEST.NODULE_EVAL.FIXED_THRESHOLD", str(threshold)]
    name = args.dataset
    if args.coco_json:
        name, register = coco_dataset_opts(args.coco_json, args.image_root)
        args.opts = list(args.opts) + register
    cfg = setup_cfg_for_weights(args, "evaluate.py", inputs)
    if args.image_labels:
        return evaluate_image_labels(args, cfg, threshold)

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
    attach_malignancy_temperature(model, resolve_malignancy_temperature(cfg))
    timed = ModelTimer(model)
    evaluator = build_evaluators(cfg, name, args.output, class_agnostic=class_agnostic)
    results = inference_on_dataset(timed, Trainer.build_test_loader(cfg, name), evaluator)

    metrics = flat_metrics(results)
    metrics["seconds_per_image"] = timed.seconds_per_image
    metrics["images_per_batch"] = float(cfg.TEST.IMS_PER_BATCH)
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
