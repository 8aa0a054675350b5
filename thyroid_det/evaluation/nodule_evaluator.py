"""Per-nodule clinical evaluation of a detector: how many nodules it finds (recall, FROC) and how
well it tells malignant from benign on the nodules it finds (accuracy, sensitivity, specificity,
ROC AUC with a bootstrap interval), overall and per nodule size or metadata group."""

import csv
import io
import itertools
import logging
import math
import os
from collections import OrderedDict

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import Boxes, BoxMode, pairwise_iou
from detectron2.utils import comm
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score, roc_curve
from tabulate import tabulate

from ..data.dicom import box_size_mm
from ..utils.file_io import atomic_write_json, atomic_write_text
from .calibration import calibration_metrics, reliability_curve
from .operating_points import (
    fixed_threshold_metrics,
    percentile_interval,
    standard_operating_points,
)
from .plots import plot_froc_curves, plot_reliability_diagram, plot_roc_curves

logger = logging.getLogger(__name__)

FROC_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
SIZE_GROUPS = ("small", "middle", "large")
BENIGN, MALIGNANT = 0, 1
NAN = float("nan")
# Cascade outputs whose malignant probability is also scored on its own (the paper's Table III).
STAGE_PROBS = {"coarse": "coarse_probs", "fine": "fine_probs"}
# What each metric means; written into nodule_metrics.json.
DEFINITIONS = {
    "recall50": "fraction of nodules with a detection at IoU >= 0.5 (any score the model keeps)",
    "num_missed": "nodules with no detection at IoU >= {iou:g}",
    "classification": "over found nodules: the best-scoring detection at IoU >= {iou:g} gives "
    "the malignant probability; malignant is the positive class (sensitivity), benign the "
    "negative (specificity)",
    "threshold_0.5": "accuracy, sensitivity, specificity, cm_*: malignant if probability >= 0.5",
    "youden": "*_youden: malignant if probability >= youden_threshold, the threshold maximising "
    "sensitivity + specificity - 1 over all found nodules of this set (optimistic: fix it on a "
    "validation set)",
    "auc": "ROC AUC (sklearn); 95% percentile bootstrap interval, {bootstrap} resamples of found "
    "nodules, seed {seed}",
    "froc": "detection sensitivity at <r> false positives per image: class-agnostic; in score "
    "order a detection hits an unmatched nodule at IoU >= 0.5 or is a false positive",
    "calibration": "ece: expected calibration error of the malignant probability over found "
    "nodules, {bins} equal-width bins, |fraction malignant - mean probability| weighted by bin "
    "count; brier: mean squared error of the probability (sklearn brier_score_loss)",
    "operating_points": "sensitivity_at_spec90: best sensitivity with specificity >= 0.9 "
    "(specificity_at_sens90 vice versa), threshold picked on this set, 95% bootstrap interval "
    "re-picking it per resample; *_fixed: malignant if probability >= fixed_threshold, a "
    "threshold fixed beforehand (TEST.NODULE_EVAL.FIXED_THRESHOLD), with 95% bootstrap intervals",
    "groups": "<metric>-size_<group>, <metric>-<field>_<value>; size groups count false "
    "positives over all images, metadata groups over the group's images; *_youden use the "
    "overall youden_threshold",
}


# ------------------------------------------------------------------------------------------------
# Metric functions on plain arrays
# ------------------------------------------------------------------------------------------------
def size_group(size, edges):
    """Size group of a nodule: small below ``edges[0]``, large from ``edges[1]``, else middle."""
    if size < edges[0]:
        return SIZE_GROUPS[0]
    return SIZE_GROUPS[1] if size < edges[1] else SIZE_GROUPS[2]


def malignant_probability(instances, malignant_class=MALIGNANT):
    """The model's probability that each detection is malignant.

    ``class_probs[:, malignant_class]`` when the model gives a distribution (thyroid_det models);
    otherwise, for plain detectron2 detectors, the score of a malignant detection and one minus
    the score of a benign one.
    """
    if instances.has("class_probs"):
        return instances.class_probs[:, malignant_class].float()
    scores = instances.scores.float()
    return torch.where(instances.pred_classes == malignant_class, scores, 1.0 - scores)


def _safe_ratio(num, den):
    return float(num) / den if den > 0 else NAN


def binary_metrics(y_true, y_prob, threshold):
    """Accuracy, sensitivity (malignant recall), specificity (benign recall) and the confusion
    matrix when ``y_prob >= threshold`` is called malignant."""
    y_true = np.asarray(y_true, dtype=bool)
    y_pred = np.asarray(y_prob, dtype=float) >= threshold
    tp = int(np.sum(y_true & y_pred))
    tn = int(np.sum(~y_true & ~y_pred))
    fp = int(np.sum(~y_true & y_pred))
    fn = int(np.sum(y_true & ~y_pred))
    return {
        "accuracy": _safe_ratio(tp + tn, len(y_true)),
        "sensitivity": _safe_ratio(tp, tp + fn),
        "specificity": _safe_ratio(tn, tn + fp),
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
    }


def youden_threshold(y_true, y_prob):
    """The threshold that maximises sensitivity + specificity - 1 (NaN with one class only).

    Among equally good thresholds the highest is taken. It is chosen on the data it is reported
    on, hence optimistic: fix it on a validation set for a deployed operating point.
    """
    y_true = np.asarray(y_true, dtype=bool)
    if y_true.all() or not y_true.any():
        return NAN
    fpr, tpr, thresholds = roc_curve(y_true, y_prob)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0)) if np.isfinite(thresholds[best]) else 1.0 + 1e-6


def rank_auc(y_true, y_score):
    """ROC AUC of each row by the rank-sum (Mann-Whitney) formula, ties counted half; NaN for a
    row with one class. Vectorised over rows so that bootstrap resamples cost one call."""
    y_true = np.atleast_2d(np.asarray(y_true, dtype=bool))
    ranks = rankdata(np.atleast_2d(y_score), axis=1)
    num_pos = y_true.sum(axis=1)
    num_neg = y_true.shape[1] - num_pos
    rank_sum = np.where(y_true, ranks, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg)


def bootstrap_auc_interval(y_true, y_prob, num_resamples, seed=0, level=0.95, chunk=250):
    """Percentile bootstrap interval of the ROC AUC, resampling nodules with replacement.

    Resamples that hold a single class are dropped; the interval is NaN when fewer than ten
    resamples remain.
    """
    y_true = np.asarray(y_true, dtype=bool)
    y_prob = np.asarray(y_prob, dtype=float)
    n = len(y_true)
    if n == 0 or num_resamples <= 0:
        return NAN, NAN
    rng = np.random.default_rng(seed)
    aucs = []
    for start in range(0, num_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, num_resamples - start), n))
        aucs.append(rank_auc(y_true[idx], y_prob[idx]))
    return percentile_interval(np.concatenate(aucs), level)


def froc_operating_points(scores, is_tp, num_gt, num_images):
    """FROC operating points: (false positives per image, sensitivity) at every score threshold,
    from the strictest (nothing kept: (0, 0)) to keeping every detection.

    A threshold falls only between distinct scores, so tied detections enter together.
    """
    scores = np.asarray(scores, dtype=float)
    is_tp = np.asarray(is_tp, dtype=bool)
    if num_gt == 0 or num_images == 0:
        return np.zeros(1), np.full(1, NAN)
    order = np.argsort(-scores, kind="stable")
    scores, is_tp = scores[order], is_tp[order]
    last_of_run = np.r_[scores[1:] != scores[:-1], True] if len(scores) else np.zeros(0, bool)
    tp = np.cumsum(is_tp)[last_of_run]
    fp = np.cumsum(~is_tp)[last_of_run]
    fppi = np.r_[0.0, fp / float(num_images)]
    sensitivity = np.r_[0.0, tp / float(num_gt)]
    return fppi, sensitivity


def sensitivity_at_fp_rates(fppi, sensitivity, rates=FROC_FP_RATES):
    """The best sensitivity reachable with at most each rate of false positives per image."""
    out = []
    for rate in rates:
        ok = fppi <= rate
        out.append(float(np.max(sensitivity[ok])) if ok.any() else NAN)
    return out


def _froc_key(rate):
    return f"froc@{rate:g}fp"


# ------------------------------------------------------------------------------------------------
# Matching detections to ground truth
# ------------------------------------------------------------------------------------------------
def match_image(gt_boxes, det_boxes, det_scores, iou_threshold, froc_iou=0.5):
    """Match one image's detections to its ground-truth nodules.

    Args:
        gt_boxes (Tensor): (M, 4) XYXY ground-truth boxes.
        det_boxes (Tensor): (N, 4) XYXY detections; ``det_scores`` (N,) their scores.
        iou_threshold (float): IoU at which a detection finds a nodule for classification.
        froc_iou (float): IoU of the recall and FROC criteria.

    Returns:
        dict of numpy arrays: per nodule ``match`` (index of the best-scoring detection with IoU
        >= iou_threshold, ties broken by IoU; -1 if missed), ``match_iou``, ``best_iou`` (over all
        detections) ; per detection ``froc_hit``: the nodule it hits under greedy score-ordered
        one-to-one matching at ``froc_iou`` (a duplicate or a miss: -1, a false positive).
    """
    num_gt, num_det = len(gt_boxes), len(det_boxes)
    iou = pairwise_iou(Boxes(gt_boxes), Boxes(det_boxes)).numpy() if num_gt and num_det else None
    scores = np.asarray(det_scores, dtype=float)
    match = np.full(num_gt, -1, dtype=np.int64)
    match_iou = np.zeros(num_gt)
    best_iou = np.zeros(num_gt)
    froc_hit = np.full(num_det, -1, dtype=np.int64)
    if iou is None:
        return {"match": match, "match_iou": match_iou, "best_iou": best_iou, "froc_hit": froc_hit}
    best_iou = iou.max(axis=1)
    for j in range(num_gt):
        candidates = np.flatnonzero(iou[j] >= iou_threshold)
        if len(candidates):
            # Highest score first, then highest IoU: lexsort sorts by its last key first.
            best = candidates[np.lexsort((-iou[j, candidates], -scores[candidates]))[0]]
            match[j], match_iou[j] = best, iou[j, best]
    taken = np.zeros(num_gt, dtype=bool)
    for d in np.argsort(-scores, kind="stable"):
        overlaps = np.where(taken, -1.0, iou[:, d])
        j = int(np.argmax(overlaps))
        if overlaps[j] >= froc_iou:
            taken[j] = True
            froc_hit[d] = j
    return {"match": match, "match_iou": match_iou, "best_iou": best_iou, "froc_hit": froc_hit}


# ------------------------------------------------------------------------------------------------
# The evaluator
# ------------------------------------------------------------------------------------------------
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
            dict: "metrics" (flat name -> float, what :meth:`evaluate` returns), "nodules" (one
            dict per ground-truth nodule), "curves" (ROC and FROC data per group), "details"
            (definitions and per-group metrics, for nodule_metrics.json) and "notes" (why some
            metrics are undefined).
        """
        notes = []
        records = DatasetCatalog.get(self._dataset_name)
        classes = list(
            MetadataCatalog.get(self._dataset_name).get("thing_classes", ["benign", "malignant"])
        )
        labels = self._diagnosis_labels(classes, notes)
        images = self._pair_with_records(predictions, records, notes)
        nodules, arrays = self._match_all(images, classes, labels)
        size_definition = self._assign_size_groups(nodules)
        classify = labels is not None
        if classify and (arrays["label"] < 0).any():
            notes.append(
                f"{int((arrays['label'] < 0).sum())} nodules have a category that is neither "
                "benign nor malignant: left out of the benign/malignant metrics"
            )
        if images and len(arrays["score"]) == 0:
            notes.append("no detections at all: recall is 0, benign/malignant metrics undefined")

        usable = arrays["detected"] & (arrays["label"] >= 0)
        youden = (
            youden_threshold(arrays["label"][usable], arrays["prob"][usable]) if classify else NAN
        )
        all_nodules, all_images = np.ones(len(nodules), bool), np.ones(len(images), bool)
        metrics, curves_all = self._subset(
            arrays, all_nodules, all_images, classify, youden, notes, "all"
        )
        metrics["num_images"] = float(len(images))
        if classify:
            metrics["youden_threshold"] = youden
        if classify:
            metrics.update(self._stage_metrics(nodules, usable))
            metrics.update(
                self._probability_metrics(arrays["label"][usable], arrays["prob"][usable])
            )
            curves_all["reliability"] = reliability_curve(
                arrays["label"][usable], arrays["prob"][usable], self._calibration_bins
            )
        curves, groups = OrderedDict(all=curves_all), OrderedDict()
        for suffix, nodule_mask, image_mask in self._group_masks(nodules, images, notes):
            groups[suffix], curves[suffix] = self._subset(
                arrays, nodule_mask, image_mask, classify, youden, notes, suffix
            )
            metrics.update({f"{k}-{suffix}": v for k, v in groups[suffix].items()})

        for n in nodules:
            called = classify and n["detected"] and n["label"] >= 0
            n["prediction"] = (
                ("malignant" if n["malignant_prob"] >= 0.5 else "benign") if called else ""
            )
        details = {
            "dataset": self._dataset_name,
            "classes": classes,
            "match_iou": self._iou_threshold,
            "size_groups": size_definition,
            "size_group_counts": {
                g: sum(n["size_group"] == g for n in nodules) for g in SIZE_GROUPS
            },
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
            "curves": curves,
            "details": details,
            "notes": notes,
        }

    def _assign_size_groups(self, nodules):
        """Group nodules by millimetres when every one is calibrated, else by pixels; returns
        the definition used."""
        if nodules and all(n["size_mm"] is not None for n in nodules):
            low, high = self._size_edges_mm
            for n in nodules:
                n["size_group"] = size_group(n["size_mm"], self._size_edges_mm)
            return (
                "equivalent diameter sqrt(width * height) of the ground-truth box in millimetres "
                f"(DICOM calibration): small < {low:g} mm <= middle < {high:g} mm <= large"
            )
        low, high = self._size_edges
        for n in nodules:
            n["size_group"] = size_group(n["size"], self._size_edges)
        why = "" if not any(n["size_mm"] is not None for n in nodules) else (
            f" ({sum(n['size_mm'] is None for n in nodules)} nodules lack a physical calibration)"
        )
        return (
            "sqrt(width * height) of the ground-truth box in original-image pixels: "
            f"small < {low:g} <= middle < {high:g} <= large{why}"
        )

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
            for name in ("accuracy", "sensitivity", "specificity"):
                metrics[f"{name}_fixed"] = fixed[name]
                metrics[f"{name}_fixed_ci_low"] = fixed[f"{name}_ci_low"]
                metrics[f"{name}_fixed_ci_high"] = fixed[f"{name}_ci_high"]
        return metrics

    @staticmethod
    def _stage_metrics(nodules, usable):
        """accuracy/sensitivity/specificity/auc ``_coarse`` and ``_fine``: the cascade's stages
        scored alone on the same found nodules, when every image's output has them."""
        metrics = {}
        found = [n for n, ok in zip(nodules, usable) if ok]
        for stage in STAGE_PROBS:
            key = f"{stage}_prob"
            if not found or not all(key in n for n in found):
                continue
            y_true = np.array([n["label"] for n in found])
            y_prob = np.array([n[key] for n in found])
            values = binary_metrics(y_true, y_prob, 0.5)
            for name in ("accuracy", "sensitivity", "specificity"):
                metrics[f"{name}_{stage}"] = values[name]
            both = len(np.unique(y_true)) == 2
            metrics[f"auc_{stage}"] = float(roc_auc_score(y_true, y_prob)) if both else NAN
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

    def _pair_with_records(self, predictions, records, notes):
        """[(dataset record, prediction)] per evaluated image, by image_id, else by file name."""
        by_id, by_file = {}, {}
        for record in records:
            if record.get("image_id") is not None:
                by_id.setdefault(record["image_id"], record)
            by_file.setdefault(record.get("file_name"), record)
        seen, images = set(), []
        for pred in predictions:
            record = by_id.get(pred["image_id"]) if pred["image_id"] is not None else None
            record = record or by_file.get(pred["file_name"])
            if record is None:
                raise KeyError(
                    f"prediction for image_id={pred['image_id']!r} ({pred['file_name']}) has no "
                    f"record in dataset '{self._dataset_name}'"
                )
            key = (record.get("image_id"), record.get("file_name"))
            if key not in seen:  # an image evaluated twice counts once
                seen.add(key)
                images.append((record, pred))
        if len(images) < len(records):
            notes.append(
                f"{len(records) - len(images)} of {len(records)} images of '{self._dataset_name}' "
                "were not evaluated (no predictions for them)"
            )
        if not images:
            notes.append("empty evaluation: no images")
        return images

    def _match_all(self, images, classes, labels):
        """Match every image; returns per-nodule dicts and the flat arrays the metrics use."""
        nodules, det_image, det_score, det_hit = [], [], [], []
        for image_index, (record, pred) in enumerate(images):
            annotations = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
            gt = np.array(
                [
                    BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS)
                    for a in annotations
                ],
                dtype=np.float32,
            ).reshape(-1, 4)
            result = match_image(
                torch.from_numpy(gt),
                torch.from_numpy(pred["boxes"]),
                pred["scores"],
                self._iou_threshold,
            )
            det_image += [image_index] * len(pred["scores"])
            det_score += pred["scores"].tolist()
            det_hit += [h + len(nodules) if h >= 0 else -1 for h in result["froc_hit"].tolist()]
            for j, ann in enumerate(annotations):
                d = int(result["match"][j])
                size = math.sqrt(max(gt[j, 2] - gt[j, 0], 0.0) * max(gt[j, 3] - gt[j, 1], 0.0))
                physical = (
                    box_size_mm(record["calibration"], gt[j].tolist())
                    if record.get("calibration")
                    else {}
                )
                category = ann.get("category_id")
                known = isinstance(category, int) and 0 <= category < len(classes)
                nodules.append(
                    {
                        "image_index": image_index,
                        "image_id": record.get("image_id"),
                        "file_name": record.get("file_name"),
                        "box": gt[j].tolist(),
                        "category": classes[category] if known else category,
                        "label": labels.get(category, -1) if labels is not None else -1,
                        "size": size,
                        "size_mm": physical.get("diameter_mm"),
                        "size_group": "",  # set by _assign_size_groups
                        "groups": {f: ann.get(f, record.get(f)) for f in self._group_by},
                        "detected": d >= 0,
                        "hit50": bool(result["best_iou"][j] >= 0.5),
                        "iou": float(result["match_iou"][j] if d >= 0 else result["best_iou"][j]),
                        "score": float(pred["scores"][d]) if d >= 0 else NAN,
                        "malignant_prob": float(pred["malignant_prob"][d]) if d >= 0 else NAN,
                        **{
                            f"{stage}_prob": float(pred[f"{stage}_prob"][d]) if d >= 0 else NAN
                            for stage in STAGE_PROBS
                            if f"{stage}_prob" in pred
                        },
                    }
                )
        arrays = {
            "image": np.asarray(det_image, dtype=np.int64),
            "score": np.asarray(det_score, dtype=float),
            "hit": np.asarray(det_hit, dtype=np.int64),
            "label": np.asarray([n["label"] for n in nodules], dtype=np.int64),
            "detected": np.asarray([n["detected"] for n in nodules], dtype=bool),
            "hit50": np.asarray([n["hit50"] for n in nodules], dtype=bool),
            "prob": np.asarray([n["malignant_prob"] for n in nodules], dtype=float),
            "nodule_image": np.asarray([n["image_index"] for n in nodules], dtype=np.int64),
        }
        return nodules, arrays

    def _group_masks(self, nodules, images, notes):
        """(suffix, nodule mask, image mask) of each size group and each GROUP_BY value.

        Size groups count false positives on every image; a metadata group on its own images
        (those whose record, or one of whose nodules, carries the value).
        """
        all_images = np.ones(len(images), dtype=bool)
        for group in SIZE_GROUPS:
            yield f"size_{group}", np.array(
                [n["size_group"] == group for n in nodules], bool
            ), all_images
        nodule_image = np.array([n["image_index"] for n in nodules], dtype=np.int64)
        for field in self._group_by:
            values = {str(n["groups"][field]) for n in nodules if n["groups"][field] is not None}
            values |= {str(r[field]) for r, _ in images if r.get(field) is not None}
            if not values:
                notes.append(f"GROUP_BY field '{field}' is carried by no record: not broken down")
            for value in sorted(values):
                mask = np.array([str(n["groups"][field]) == value for n in nodules], dtype=bool)
                image_mask = np.array([str(r.get(field)) == value for r, _ in images], dtype=bool)
                image_mask[nodule_image[mask]] = True
                yield f"{field}_{value}", mask, image_mask

    def _subset(self, arrays, nodule_mask, image_mask, classify, youden, notes, name):
        """Metrics over the nodules in ``nodule_mask`` and false positives of ``image_mask``."""
        m = OrderedDict()
        num_nodules = int(nodule_mask.sum())
        m["num_nodules"] = float(num_nodules)
        m["recall50"] = float(arrays["hit50"][nodule_mask].mean()) if num_nodules else NAN
        m["num_detected"] = float((arrays["detected"] & nodule_mask).sum())
        m["num_missed"] = float(num_nodules - m["num_detected"])
        if num_nodules == 0:
            notes.append(f"[{name}] no ground-truth nodules: its metrics are undefined (NaN)")

        in_images = image_mask[arrays["image"]] if len(arrays["image"]) else np.zeros(0, bool)
        hit = arrays["hit"]
        hit_in_group = np.zeros(len(hit), dtype=bool)
        hit_in_group[hit >= 0] = nodule_mask[hit[hit >= 0]]
        keep = in_images & ((hit < 0) | hit_in_group)
        fppi, sensitivity = froc_operating_points(
            arrays["score"][keep], hit[keep] >= 0, num_nodules, int(image_mask.sum())
        )
        froc = sensitivity_at_fp_rates(fppi, sensitivity)
        for rate, value in zip(FROC_FP_RATES, froc):
            m[_froc_key(rate)] = value
        m["froc_cpm"] = float(np.mean(froc)) if np.isfinite(froc).all() else NAN
        curves = {"froc": (fppi, sensitivity)}
        if not classify:
            return m, curves

        usable = nodule_mask & arrays["detected"] & (arrays["label"] >= 0)
        y_true, y_prob = arrays["label"][usable], arrays["prob"][usable]
        m["num_malignant"] = float((y_true == 1).sum())
        m["num_benign"] = float((y_true == 0).sum())
        for suffix, threshold in (("", 0.5), ("_youden", youden)):
            if math.isnan(threshold):
                values = {
                    k: NAN
                    for k in ("accuracy", "sensitivity", "specificity", "tn", "fp", "fn", "tp")
                }
            else:
                values = binary_metrics(y_true, y_prob, threshold)
            for key in ("accuracy", "sensitivity", "specificity"):
                m[key + suffix] = values[key]
            for key in ("tn", "fp", "fn", "tp"):
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
            m["auc"] = float(roc_auc_score(y_true, y_prob))
            m["auc_ci_low"], m["auc_ci_high"] = bootstrap_auc_interval(
                y_true, y_prob, self._bootstrap, seed=self._seed
            )
        curves["roc"] = (y_true, y_prob)
        return m, curves

    # --------------------------------------------------------------------------------------------
    def _log(self, report):
        for note in report["notes"]:
            logger.warning(f"NoduleEvaluator ({self._dataset_name}): {note}")
        logger.info(
            f"Nodule evaluation of '{self._dataset_name}'. "
            f"Size groups: {report['details']['size_groups']}\n"
            + format_nodule_table(report["metrics"])
        )

    def _write(self, report):
        out = self._output_dir
        details = dict(report["details"])
        details["metrics"] = report["metrics"]
        details["froc_curve"] = {
            "fppi": report["curves"]["all"]["froc"][0],
            "sensitivity": report["curves"]["all"]["froc"][1],
        }
        details["notes"] = report["notes"]
        atomic_write_json(os.path.join(out, "nodule_metrics.json"), details)
        atomic_write_text(
            os.path.join(out, "nodules.csv"), nodule_csv(report["nodules"], self._group_by)
        )
        if "roc" in report["curves"]["all"]:
            roc = [("all", *report["curves"]["all"]["roc"])]
            roc += [
                (name, *c["roc"])
                for name, c in report["curves"].items()
                if name.startswith("size_") and len(c["roc"][0])
            ]
            plot_roc_curves(
                roc,
                os.path.join(out, "roc.png"),
                title=f"ROC, malignant vs benign: {self._dataset_name}",
            )
        if "reliability" in report["curves"]["all"]:
            m = report["metrics"]
            plot_reliability_diagram(
                [(f"all (ECE {m['ece']:.3f}, Brier {m['brier']:.3f})",
                  *report["curves"]["all"]["reliability"])],
                os.path.join(out, "reliability.png"),
                title=f"Reliability of the malignant probability: {self._dataset_name}",
            )
        froc = [
            (name, *c["froc"])
            for name, c in report["curves"].items()
            if name == "all" or name.startswith("size_")
        ]
        plot_froc_curves(
            froc, os.path.join(out, "froc.png"), FROC_FP_RATES, title=f"FROC: {self._dataset_name}"
        )


def nodule_csv(nodules, group_by=()):
    """One row per ground-truth nodule: where it is, its class and size, and what the model said."""
    stages = [f"{s}_prob" for s in STAGE_PROBS if any(f"{s}_prob" in n for n in nodules)]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        [
            "image_id",
            "file_name",
            "gt_x0",
            "gt_y0",
            "gt_x1",
            "gt_y1",
            "gt_class",
            "size_px",
            "size_mm",
            "size_group",
        ]
        + list(group_by)
        + ["detected", "iou", "score", "malignant_prob", "prediction"]
        + stages
    )
    for n in nodules:
        writer.writerow(
            [
                n["image_id"],
                n["file_name"],
                *[f"{v:.1f}" for v in n["box"]],
                n["category"],
                f"{n['size']:.1f}",
                "" if n.get("size_mm") is None else f"{n['size_mm']:.1f}",
                n["size_group"],
            ]
            + [n["groups"].get(f, "") for f in group_by]
            + [
                int(n["detected"]),
                f"{n['iou']:.3f}",
                "" if math.isnan(n["score"]) else f"{n['score']:.4f}",
                "" if math.isnan(n["malignant_prob"]) else f"{n['malignant_prob']:.4f}",
                n.get("prediction", ""),
            ]
            + ["" if math.isnan(n.get(s, NAN)) else f"{n[s]:.4f}" for s in stages]
        )
    return buf.getvalue()


def format_nodule_table(metrics):
    """A text table of the main nodule metrics, one row for all nodules and one per group."""
    groups = [""] + sorted({k.split("-", 1)[1] for k in metrics if "-" in k}, key=_group_order)
    columns = [
        "num_nodules",
        "recall50",
        "froc_cpm",
        "accuracy",
        "sensitivity",
        "specificity",
        "auc",
    ]
    rows = []
    for group in groups:
        suffix = f"-{group}" if group else ""
        row = [group or "all"]
        for c in columns:
            value = metrics.get(c + suffix, NAN)
            row.append(
                f"{value:.0f}" if c == "num_nodules" and not math.isnan(value) else f"{value:.3f}"
            )
        low, high = metrics.get("auc_ci_low" + suffix, NAN), metrics.get(
            "auc_ci_high" + suffix, NAN
        )
        row.append(f"[{low:.3f}, {high:.3f}]")
        rows.append(row)
    return tabulate(rows, headers=["group"] + columns + ["auc 95% CI"], tablefmt="pipe")


def _group_order(name):
    if name.startswith("size_") and name[5:] in SIZE_GROUPS:
        return (0, SIZE_GROUPS.index(name[5:]), name)
    return (1, 0, name)
