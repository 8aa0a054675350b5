"""Per-nodule clinical evaluation of a detector: how many nodules it finds (recall, FROC) and how
well it tells malignant from benign on the nodules it finds (accuracy, sensitivity, specificity,
ROC AUC with a bootstrap interval), overall and per nodule size or metadata group.

The metric functions live in :mod:`.metrics`, detection-to-nodule matching in :mod:`.matching`,
the written files in :mod:`.report`; this module is the DatasetEvaluator that ties them up."""

import itertools
import logging
import math
from collections import OrderedDict

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from .calibration import calibration_metrics, reliability_curve
from .matching import (  # noqa: F401  (match_image re-exported)
    STAGE_PROBS,
    match_image,
    match_images,
    pair_with_records,
    size_groups,
)
from .metrics import (  # noqa: F401  (re-exported: the evaluator's names before the split)
    BENIGN,
    FROC_FP_RATES,
    MALIGNANT,
    SIZE_GROUPS,
    binary_metrics,
    bootstrap_auc_interval,
    froc_key,
    froc_operating_points,
    malignant_probability,
    roc_auc,
    sensitivity_at_fp_rates,
    size_group,
    youden_threshold,
)
from .operating_points import fixed_threshold_metrics, standard_operating_points
from .report import DEFINITIONS, format_nodule_table, nodule_csv, write_nodule_report  # noqa: F401

logger = logging.getLogger(__name__)

NAN = float("nan")
RATE_KEYS = ("accuracy", "sensitivity", "specificity")
CM_KEYS = ("tn", "fp", "fn", "tp")


class NoduleEvaluator(DatasetEvaluator):
    """Clinical per-nodule metrics of a detector on a registered dataset.

    Ground truth comes from ``DatasetCatalog.get(dataset_name)`` in original-image coordinates,
    the same frame as the models' outputs. Each ground-truth nodule is matched to the
    best-scoring detection with IoU >= ``iou_threshold``; the malignant probability of a found
    nodule is the matched detection's (see :func:`malignant_probability`). Reported, overall and
    per group (``<metric>-size_<group>``, ``<metric>-<field>_<value>``):

    * ``recall50``: fraction of nodules hit by any detection at IoU 0.5; ``num_missed`` at
      ``iou_threshold``.
    * ``accuracy``, ``sensitivity``, ``specificity`` and the confusion matrix ``cm_tn/fp/fn/tp``
      at probability 0.5; the same with suffix ``_youden`` at ``youden_threshold`` (picked on
      the whole set, optimistic); ``auc`` with ``auc_ci_low``/``auc_ci_high`` (bootstrap 95%).
      These are over found nodules only.
    * ``froc@<r>fp``: detection sensitivity at r false positives per image (class-agnostic,
      greedy one-to-one matching at IoU 0.5), ``froc_cpm`` their mean.
    * Cascade outputs (with ``coarse_probs`` and ``fine_probs``) also get ``accuracy_coarse``,
      ``auc_coarse``, ..., ``auc_fine``: each stage alone on the same found nodules (overall).
    * Overall, on found nodules: ``ece`` and ``brier`` (calibration of the malignant
      probability), ``sensitivity_at_spec90`` / ``specificity_at_sens90`` with their thresholds
      and bootstrap intervals, and with ``TEST.NODULE_EVAL.FIXED_THRESHOLD`` >= 0
      ``accuracy_fixed``, ``sensitivity_fixed``, ``specificity_fixed`` (``_ci_low``/``_ci_high``).

    Size groups are in millimetres (``SIZE_EDGES_MM``) when every record carries a DICOM
    ``calibration``, else in pixels (``SIZE_EDGES``); ``nodule_metrics.json`` states which, with
    the counts. Writes ``nodule_metrics.json``, ``nodules.csv`` (one row per ground-truth
    nodule), ``roc.png``, ``reliability.png`` and ``froc.png`` to ``output_dir``.
    """

    def __init__(
        self,
        dataset_name,
        cfg=None,
        distributed=True,
        output_dir=None,
        *,
        iou_threshold=None,
        size_edges=None,
        size_edges_mm=None,
        bootstrap=None,
        group_by=None,
        class_agnostic=False,
        fixed_threshold=None,
        calibration_bins=None,
        seed=0,
    ):
        """
        Args:
            dataset_name (str): a dataset registered in DatasetCatalog.
            cfg (CfgNode or None): supplies ``TEST.NODULE_EVAL.*`` for the arguments left None.
            distributed (bool): gather predictions from all processes to the main one.
            output_dir (str or None): where to write the files; None writes nothing.
            iou_threshold (float): IoU at which a detection finds a nodule (default 0.5).
            size_edges (tuple[float, float]): sqrt(box area) edges of the size groups, in
                original-image pixels (default (89, 139): TN5000's terciles).
            size_edges_mm (tuple[float, float]): the same in millimetres of equivalent diameter,
                used instead when every image is calibrated (DICOM; default (10, 20)).
            bootstrap (int): resamples for the AUC interval (default 1000; 0 disables it).
            group_by (list[str]): record (or annotation) fields to break metrics down by.
            class_agnostic (bool): detection only: skip the benign/malignant metrics (for sets
                whose annotations carry no diagnosis).
            fixed_threshold (float): a malignant-probability threshold fixed beforehand (< 0:
                none); adds the ``*_fixed`` metrics.
            calibration_bins (int): bins of the ECE and the reliability diagram (default 10).
            seed (int): bootstrap seed.
        """
        nodule_cfg = cfg.TEST.NODULE_EVAL if cfg is not None else None

        def pick(value, key, default):
            if value is not None:
                return value
            return nodule_cfg[key] if nodule_cfg is not None else default

        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._iou_threshold = float(pick(iou_threshold, "IOU", 0.5))
        self._size_edges = tuple(float(e) for e in pick(size_edges, "SIZE_EDGES", (89.0, 139.0)))
        if len(self._size_edges) != 2 or self._size_edges[0] > self._size_edges[1]:
            raise ValueError(f"SIZE_EDGES must be two increasing numbers, got {self._size_edges}")
        self._size_edges_mm = tuple(float(e) for e in pick(size_edges_mm, "SIZE_EDGES_MM", (10, 20)))
        self._calibration_bins = int(pick(calibration_bins, "CALIBRATION_BINS", 10))
        self._fixed_threshold = float(pick(fixed_threshold, "FIXED_THRESHOLD", -1.0))
        self._bootstrap = int(pick(bootstrap, "BOOTSTRAP", 1000))
        self._group_by = list(pick(group_by, "GROUP_BY", []))
        self._class_agnostic = class_agnostic
        self._seed = seed
        self._predictions = []

    def reset(self):
        self._predictions = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            if "instances" not in out:
                continue
            instances = out["instances"].to("cpu")
            prediction = {
                "image_id": inp.get("image_id"),
                "file_name": inp.get("file_name"),
                "boxes": instances.pred_boxes.tensor.float().numpy(),
                "scores": instances.scores.float().numpy(),
                "malignant_prob": malignant_probability(instances).numpy(),
            }
            for stage, field in STAGE_PROBS.items():
                if instances.has(field):
                    prediction[f"{stage}_prob"] = instances.get(field)[:, MALIGNANT].float().numpy()
            self._predictions.append(prediction)

    def evaluate(self):
        predictions = self._predictions
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        report = self.compute(predictions)
        self._log(report)
        if self._output_dir:
            self._write(report)
        return OrderedDict(nodule=report["metrics"])

    # --------------------------------------------------------------------------------------------
    def compute(self, predictions):
        """All metrics from (gathered) predictions.

        Returns:
            dict: "metrics" (flat name -> float, what :meth:`evaluate` returns), "nodules" (the
            per-nodule table, a structured array), "stages" (cascade stages it carries),
            "curves" (ROC and FROC data per group), "details" (definitions and per-group
            metrics, for nodule_metrics.json) and "notes" (why some metrics are undefined).
        """
        notes = []
        records = DatasetCatalog.get(self._dataset_name)
        classes = list(
            MetadataCatalog.get(self._dataset_name).get("thing_classes", ["benign", "malignant"])
        )
        labels = self._diagnosis_labels(classes, notes)
        images = pair_with_records(predictions, records, self._dataset_name, notes)
        nodules, detections, stages = match_images(
            images, classes, labels, self._iou_threshold, self._group_by
        )
        size_definition = size_groups(nodules, self._size_edges, self._size_edges_mm)
        classify = labels is not None
        if classify and (nodules["label"] < 0).any():
            notes.append(
                f"{int((nodules['label'] < 0).sum())} nodules have a category that is neither "
                "benign nor malignant: left out of the benign/malignant metrics"
            )
        if images and len(detections) == 0:
            notes.append("no detections at all: recall is 0, benign/malignant metrics undefined")

        usable = nodules["detected"] & (nodules["label"] >= 0)
        y_true, y_prob = nodules["label"][usable], nodules["malignant_prob"][usable]
        youden = youden_threshold(y_true, y_prob) if classify else NAN
        all_nodules, all_images = np.ones(len(nodules), bool), np.ones(len(images), bool)
        metrics, curves_all = self._subset(
            nodules, detections, all_nodules, all_images, classify, youden, notes, "all"
        )
        metrics["num_images"] = float(len(images))
        if classify:
            metrics["youden_threshold"] = youden
            metrics.update(self._stage_metrics(nodules[usable], stages))
            metrics.update(self._probability_metrics(y_true, y_prob))
            curves_all["reliability"] = reliability_curve(y_true, y_prob, self._calibration_bins)
        curves, groups = OrderedDict(all=curves_all), OrderedDict()
        for suffix, nodule_mask, image_mask in self._group_masks(nodules, images, notes):
            groups[suffix], curves[suffix] = self._subset(
                nodules, detections, nodule_mask, image_mask, classify, youden, notes, suffix
            )
            metrics.update({f"{k}-{suffix}": v for k, v in groups[suffix].items()})

        if classify:
            called = np.where(nodules["malignant_prob"] >= 0.5, "malignant", "benign")
            nodules["prediction"] = np.where(usable, called, "")
        details = {
            "dataset": self._dataset_name,
            "classes": classes,
            "match_iou": self._iou_threshold,
            "size_groups": size_definition,
            "size_group_counts": {g: int((nodules["size_group"] == g).sum()) for g in SIZE_GROUPS},
            "definitions": {
                k: v.format(
                    iou=self._iou_threshold,
                    bootstrap=self._bootstrap,
                    seed=self._seed,
                    bins=self._calibration_bins,
                )
                for k, v in DEFINITIONS.items()
            },
            "groups": groups,
        }
        return {
            "metrics": metrics,
            "nodules": nodules,
            "stages": stages,
            "curves": curves,
            "details": details,
            "notes": notes,
        }

    def _probability_metrics(self, y_true, y_prob):
        """Calibration (ece, brier), the standard operating points and, when a threshold was
        fixed beforehand, accuracy/sensitivity/specificity ``_fixed`` with bootstrap intervals."""
        metrics = calibration_metrics(y_true, y_prob, self._calibration_bins)
        metrics.update(
            standard_operating_points(y_true, y_prob, self._bootstrap, seed=self._seed)
        )
        if self._fixed_threshold >= 0:
            metrics["fixed_threshold"] = self._fixed_threshold
            fixed = fixed_threshold_metrics(
                y_true, y_prob, self._fixed_threshold, self._bootstrap, seed=self._seed
            )
            for name in RATE_KEYS:
                metrics[f"{name}_fixed"] = fixed[name]
                metrics[f"{name}_fixed_ci_low"] = fixed[f"{name}_ci_low"]
                metrics[f"{name}_fixed_ci_high"] = fixed[f"{name}_ci_high"]
        return metrics

    @staticmethod
    def _stage_metrics(found, stages):
        """accuracy/sensitivity/specificity/auc ``_coarse`` and ``_fine``: the cascade's stages
        scored alone on the same found nodules, when every image's output has them."""
        metrics = {}
        for stage in stages:
            y_prob = found[f"{stage}_prob"]
            if not len(found) or not np.isfinite(y_prob).all():
                continue
            values = binary_metrics(found["label"], y_prob, 0.5)
            for name in RATE_KEYS:
                metrics[f"{name}_{stage}"] = values[name]
            metrics[f"auc_{stage}"] = roc_auc(found["label"], y_prob)
        return metrics

    def _diagnosis_labels(self, classes, notes):
        """{dataset category id: 1 malignant / 0 benign}, or None when there is no diagnosis."""
        if self._class_agnostic:
            notes.append("class-agnostic evaluation: benign/malignant metrics skipped")
            return None
        lowered = [c.lower() for c in classes]
        if "malignant" in lowered:
            malignant = lowered.index("malignant")
        elif len(classes) == 2:
            malignant = MALIGNANT
        else:
            notes.append(
                f"dataset classes {classes} carry no benign/malignant diagnosis: "
                "benign/malignant metrics skipped"
            )
            return None
        benign = lowered.index("benign") if "benign" in lowered else 1 - malignant
        return {malignant: 1, benign: 0}

    def _group_masks(self, nodules, images, notes):
        """(suffix, nodule mask, image mask) of each size group and each GROUP_BY value.

        Size groups count false positives on every image; a metadata group on its own images
        (those whose record, or one of whose nodules, carries the value).
        """
        all_images = np.ones(len(images), dtype=bool)
        for group in SIZE_GROUPS:
            yield f"size_{group}", nodules["size_group"] == group, all_images
        for field in self._group_by:
            column = nodules[f"group:{field}"]
            values = {str(v) for v in column if v is not None}
            values |= {str(r[field]) for r, _ in images if r.get(field) is not None}
            if not values:
                notes.append(f"GROUP_BY field '{field}' is carried by no record: not broken down")
            for value in sorted(values):
                mask = np.array([str(v) == value for v in column], dtype=bool)
                image_mask = np.array([str(r.get(field)) == value for r, _ in images], dtype=bool)
                image_mask[nodules["image_index"][mask]] = True
                yield f"{field}_{value}", mask, image_mask

    def _subset(self, nodules, detections, nodule_mask, image_mask, classify, youden, notes, name):
        """Metrics over the nodules in ``nodule_mask`` and false positives of ``image_mask``."""
        m = OrderedDict()
        num_nodules = int(nodule_mask.sum())
        m["num_nodules"] = float(num_nodules)
        m["recall50"] = float(nodules["hit50"][nodule_mask].mean()) if num_nodules else NAN
        m["num_detected"] = float((nodules["detected"] & nodule_mask).sum())
        m["num_missed"] = float(num_nodules - m["num_detected"])
        if num_nodules == 0:
            notes.append(f"[{name}] no ground-truth nodules: its metrics are undefined (NaN)")

        hit = detections["hit"]
        in_images = image_mask[detections["image_index"]] if len(hit) else np.zeros(0, bool)
        hit_in_group = np.zeros(len(hit), dtype=bool)
        hit_in_group[hit >= 0] = nodule_mask[hit[hit >= 0]]
        keep = in_images & ((hit < 0) | hit_in_group)
        fppi, sensitivity = froc_operating_points(
            detections["score"][keep], hit[keep] >= 0, num_nodules, int(image_mask.sum())
        )
        froc = sensitivity_at_fp_rates(fppi, sensitivity)
        for rate, value in zip(FROC_FP_RATES, froc):
            m[froc_key(rate)] = value
        m["froc_cpm"] = float(np.mean(froc)) if np.isfinite(froc).all() else NAN
        curves = {"froc": (fppi, sensitivity)}
        if not classify:
            return m, curves

        usable = nodule_mask & nodules["detected"] & (nodules["label"] >= 0)
        y_true, y_prob = nodules["label"][usable], nodules["malignant_prob"][usable]
        m["num_malignant"] = float((y_true == 1).sum())
        m["num_benign"] = float((y_true == 0).sum())
        for suffix, threshold in (("", 0.5), ("_youden", youden)):
            if math.isnan(threshold):
                values = {k: NAN for k in RATE_KEYS + CM_KEYS}
            else:
                values = binary_metrics(y_true, y_prob, threshold)
            for key in RATE_KEYS:
                m[key + suffix] = values[key]
            for key in CM_KEYS:
                m[f"cm_{key}{suffix}"] = float(values[key])
        if len(y_true) == 0 and num_nodules:
            notes.append(
                f"[{name}] no found nodule with a diagnosis: benign/malignant metrics undefined"
            )
        if len(np.unique(y_true)) < 2:
            if len(y_true):
                only = "malignant" if y_true[0] == 1 else "benign"
                notes.append(
                    f"[{name}] all {len(y_true)} found nodules are {only}: AUC undefined (NaN)"
                )
            m["auc"], m["auc_ci_low"], m["auc_ci_high"] = NAN, NAN, NAN
        else:
            m["auc"] = roc_auc(y_true, y_prob)
            m["auc_ci_low"], m["auc_ci_high"] = bootstrap_auc_interval(
                y_true, y_prob, self._bootstrap, seed=self._seed
            )
        curves["roc"] = (y_true, y_prob)
        return m, curves

    def _log(self, report):
        for note in report["notes"]:
            logger.warning(f"NoduleEvaluator ({self._dataset_name}): {note}")
        logger.info(
            f"Nodule evaluation of '{self._dataset_name}'. "
            f"Size groups: {report['details']['size_groups']}\n"
            + format_nodule_table(report["metrics"])
        )

    def _write(self, report):
        write_nodule_report(report, self._output_dir, self._dataset_name, self._group_by)
