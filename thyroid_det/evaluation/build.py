"""The evaluators that training and tools/evaluate.py run: COCO box AP plus the nodule metrics."""

import math
import os

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, DatasetEvaluators
from detectron2.structures import Instances
from tabulate import tabulate

from .nodule_evaluator import NoduleEvaluator


def has_compiled_ops():
    """Whether detectron2's compiled ops (and so COCOEvaluator's fast AP) are importable."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


class PerClassAP50COCOEvaluator(COCOEvaluator):
    """detectron2's COCOEvaluator, plus each class's AP at IoU 0.5 as ``"AP50-<class>"``.

    Clinical detection papers report AP50 per diagnosis; COCOEvaluator gives per-class AP only
    averaged over IoU 0.5:0.95. Read from the same COCOeval precision table, in percent.
    """

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)
        if not class_names or len(class_names) <= 1:
            return results
        if coco_eval is None:
            results.update({f"AP50-{name}": float("nan") for name in class_names})
            return results
        iou50 = int(np.argmin(np.abs(coco_eval.params.iouThrs - 0.5)))
        # precision: (iou, recall, class, area range "all", max dets: the largest)
        precisions = coco_eval.eval["precision"][iou50, :, :, 0, -1]
        per_class = {}
        for idx, name in enumerate(class_names):
            precision = precisions[:, idx]
            precision = precision[precision > -1]
            ap50 = float(precision.mean() * 100) if precision.size else float("nan")
            per_class[f"AP50-{name}"] = ap50
        table = tabulate(
            [[k[len("AP50-"):], v] for k, v in per_class.items()],
            headers=["category", "AP50"],
            floatfmt=".3f",
        )
        self._logger.info(f"Per-category {iou_type} AP50:\n{table}")
        results.update(per_class)
        return results


def register_class_agnostic(dataset_name):
    """Register ``<dataset_name>_class_agnostic``: the same images with every annotation in one
    category, "nodule". Returns its name."""
    name = f"{dataset_name}_class_agnostic"
    if name not in DatasetCatalog.list():

        def load():
            records = []
            for record in DatasetCatalog.get(dataset_name):
                record = dict(record)
                record["annotations"] = [
                    dict(a, category_id=0) for a in record.get("annotations", [])
                ]
                records.append(record)
            return records

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(thing_classes=["nodule"], evaluator_type="coco")
    return name


class ClassAgnosticOutputs(DatasetEvaluator):
    """Feeds another evaluator outputs whose detections all have class 0 ("nodule").

    ``result_key``, when given, renames the wrapped evaluator's single result task (e.g. "bbox"
    -> "bbox_agnostic"), so that class-aware and class-agnostic AP can sit side by side in one
    :class:`DatasetEvaluators`.
    """

    def __init__(self, evaluator, result_key=None):
        self._evaluator = evaluator
        self._result_key = result_key

    def reset(self):
        self._evaluator.reset()

    def process(self, inputs, outputs):
        relabelled = []
        for out in outputs:
            if "instances" in out:
                fields = out["instances"].get_fields()
                instances = Instances(out["instances"].image_size, **fields)
                instances.pred_classes = fields["pred_classes"].new_zeros(len(instances))
                out = dict(out, instances=instances)
            relabelled.append(out)
        self._evaluator.process(inputs, relabelled)

    def evaluate(self):
        results = self._evaluator.evaluate()
        if self._result_key is None or not results:
            return results
        return {self._result_key: res for res in results.values()}


def flat_metrics(results):
    """``{"bbox": {"AP": ..}, "nodule": {..}}`` -> ``{"bbox.AP": .., "nodule.auc": ..}``, floats:
    the key scheme of tools/evaluate.py's and tools/cross_validate.py's JSON files."""
    return {f"{task}.{k}": float(v) for task, res in results.items() for k, v in res.items()}


# The metrics the tools print, in this order: tools/evaluate.py all of them, each fold of
# tools/cross_validate.py the headline ones (FOLD_SUMMARY_KEYS).
FOLD_SUMMARY_KEYS = (
    "bbox.AP",
    "bbox.AP50",
    "bbox.AP50-benign",
    "bbox.AP50-malignant",
    "bbox_agnostic.AP50",
    "nodule.recall50",
    "nodule.froc_cpm",
    "nodule.accuracy",
    "nodule.sensitivity",
    "nodule.specificity",
    "nodule.auc",
)
SUMMARY_KEYS = (
    FOLD_SUMMARY_KEYS[:4]
    + ("bbox.AP75",)
    + FOLD_SUMMARY_KEYS[4:]
    + (
        "nodule.youden_threshold",
        "nodule.accuracy_youden",
        "nodule.sensitivity_youden",
        "nodule.specificity_youden",
        "nodule.auc_coarse",
        "nodule.auc_fine",
        "nodule.ece",
        "nodule.brier",
        "nodule.sensitivity_at_spec90",
        "nodule.specificity_at_sens90",
        "nodule.fixed_threshold",
        "nodule.accuracy_fixed",
        "nodule.sensitivity_fixed",
        "nodule.specificity_fixed",
        "seconds_per_image",
    )
)


def format_summary(metrics):
    """The :data:`SUMMARY_KEYS` of flat ``metrics`` as a table (bbox.* in percent, two decimals;
    the others four), with ``[low, high]`` where ``<key>_ci_low``/``_ci_high`` exist."""
    rows = []
    for key in SUMMARY_KEYS:
        if key not in metrics:
            continue
        value = metrics[key]
        text = (
            "nan"
            if math.isnan(value)
            else (f"{value:.2f}" if key.startswith("bbox") else f"{value:.4f}")
        )
        if f"{key}_ci_low" in metrics:
            text += f"  [{metrics[f'{key}_ci_low']:.3f}, {metrics[f'{key}_ci_high']:.3f}]"
        rows.append((key, text))
    return tabulate(rows, headers=["metric", "value"], tablefmt="pipe")


def build_evaluators(cfg, dataset_name, output_dir, class_agnostic=False, distributed=True):
    """COCO box AP and :class:`NoduleEvaluator` on one dataset, combined.

    Args:
        cfg (CfgNode): supplies ``TEST.NODULE_EVAL.*`` and ``TEST.DETECTIONS_PER_IMAGE``.
        dataset_name (str): a registered dataset.
        output_dir (str): where the evaluators write their files.
        class_agnostic (bool): score only the detection of "a nodule" whatever its class: COCO
            AP over one merged category, benign/malignant metrics skipped.
        distributed (bool): gather results from all processes.

    Returns:
        DatasetEvaluators: results under "bbox" (COCO), "nodule" and, unless ``class_agnostic``
        (where "bbox" already is that), "bbox_agnostic": COCO AP with both classes merged into
        one, the measure of finding nodules that the published single-class detectors report.
    """

    def coco(name, subdir=""):
        return PerClassAP50COCOEvaluator(
            name,
            tasks=("bbox",),
            distributed=distributed,
            output_dir=os.path.join(output_dir, subdir) if output_dir else output_dir,
            max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            use_fast_impl=has_compiled_ops(),
        )

    agnostic = ClassAgnosticOutputs(
        coco(register_class_agnostic(dataset_name), "" if class_agnostic else "class_agnostic"),
        result_key=None if class_agnostic else "bbox_agnostic",
    )
    nodule = NoduleEvaluator(
        dataset_name,
        cfg=cfg,
        distributed=distributed,
        output_dir=output_dir,
        class_agnostic=class_agnostic,
        seed=max(cfg.SEED, 0),
    )
    if class_agnostic:
        return DatasetEvaluators([agnostic, nodule])
    return DatasetEvaluators([coco(dataset_name), agnostic, nodule])
