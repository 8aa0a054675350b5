"""Image-level external validation: sets with one benign/malignant label per image (or crop) and
no boxes. An image's malignancy is its most suspicious detection (the highest malignant
probability among detections with score >= a minimum, over all frames of a DICOM cine); images
where nothing was detected are counted, listed and left out of the metrics."""

import csv
import io
import os

import numpy as np

from ..data.dicom import model_image, read_frames
from .metrics import bootstrap_auc_interval, malignant_probability, roc_auc
from .operating_points import fixed_threshold_metrics

__all__ = ["image_level_metrics", "images_csv", "read_image_labels", "score_images"]

NAN = float("nan")
LABELS = {"benign": 0, "malignant": 1, "0": 0, "1": 1}


def read_image_labels(csv_path, image_root=None):
    """``[(image path, 0 benign / 1 malignant)]`` from a CSV with columns ``image`` and
    ``label`` (benign/malignant or 0/1); relative paths are taken from ``image_root``, else the
    CSV's folder.

    Raises:
        ValueError: naming the file and line of a bad row.
    """
    root = image_root or os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{csv_path}: needs a header with columns 'image' and 'label'")
        items = []
        for line, row in enumerate(reader, start=2):
            label = LABELS.get(str(row["label"]).strip().lower())
            if label is None or not row["image"]:
                raise ValueError(
                    f"{csv_path}:{line}: label {row['label']!r} is not benign/malignant/0/1"
                    if row["image"]
                    else f"{csv_path}:{line}: empty image name"
                )
            items.append((os.path.join(root, row["image"].strip()), label))
    if not items:
        raise ValueError(f"{csv_path}: no images listed")
    return items


def score_images(predictor, items, min_score=0.3, scale_16bit="full"):
    """Run ``predictor`` (thyroid_det.engine.Predictor) on every frame of every image.

    Returns:
        list[dict]: per image ``file_name``, ``label``, ``malignant_prob`` (of the most
        suspicious detection; NaN when none), ``frame`` (where it was), ``num_detections``
        (score >= ``min_score``, all frames) and ``error`` (unreadable file, else "").
    """
    results = []
    for path, label in items:
        row = {"file_name": path, "label": label, "malignant_prob": NAN, "frame": "",
               "num_detections": 0, "error": ""}
        try:
            frames = read_frames(path, scale_16bit)
        except OSError as e:
            row["error"] = str(e)
            results.append(row)
            continue
        for frame in frames:
            image = model_image(path, frame, predictor.input_format, scale_16bit)
            instances = predictor(image)["instances"].to("cpu")
            kept = instances[instances.scores >= min_score]
            row["num_detections"] += len(kept)
            if len(kept):
                best = float(malignant_probability(kept).max())
                if not best <= row["malignant_prob"]:  # NaN compares False: the first one wins
                    row["malignant_prob"] = best
                    row["frame"] = "" if frame.index is None else frame.index
        results.append(row)
    return results


def image_level_metrics(results, threshold=0.5, num_resamples=1000, seed=0):
    """Accuracy, sensitivity and specificity at ``threshold`` and ROC AUC, each with a 95%
    bootstrap interval, over the images with a detection; plus the counts and the list of images
    with no detection (and of unreadable ones)."""
    scored = [r for r in results if not r["error"] and r["num_detections"]]
    y = np.array([r["label"] for r in scored], dtype=int)
    p = np.array([r["malignant_prob"] for r in scored], dtype=float)
    metrics = {
        "num_images": len(results),
        "num_scored": len(scored),
        "num_no_detection": sum(1 for r in results if not r["error"] and not r["num_detections"]),
        "num_unreadable": sum(1 for r in results if r["error"]),
        "num_malignant": int(y.sum()),
        "num_benign": int(len(y) - y.sum()),
        "threshold": threshold,
    }
    metrics.update(fixed_threshold_metrics(y, p, threshold, num_resamples, seed=seed))
    if len(np.unique(y)) == 2:
        metrics["auc"] = roc_auc(y, p)
        metrics["auc_ci_low"], metrics["auc_ci_high"] = bootstrap_auc_interval(
            y, p, num_resamples, seed=seed
        )
    else:
        metrics["auc"] = metrics["auc_ci_low"] = metrics["auc_ci_high"] = NAN
    metrics["no_detection"] = [
        r["file_name"] for r in results if not r["error"] and not r["num_detections"]
    ]
    metrics["unreadable"] = {r["file_name"]: r["error"] for r in results if r["error"]}
    return metrics


def images_csv(results):
    """One row per image: file, label, the most suspicious detection's probability and frame."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file_name", "label", "malignant_prob", "frame", "num_detections", "error"])
    for r in results:
        prob = "" if np.isnan(r["malignant_prob"]) else f"{r['malignant_prob']:.4f}"
        writer.writerow(
            [r["file_name"], ("benign", "malignant")[r["label"]], prob, r["frame"],
             r["num_detections"], r["error"]]
        )
    return buf.getvalue()
