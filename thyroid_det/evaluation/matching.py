"""Matching detections to ground-truth nodules: predictions paired with dataset records, each
nodule matched to its best detection, and the result as two tables (structured numpy arrays):
one row per ground-truth nodule and one per detection, the only inputs the metrics read."""

import math

import numpy as np
import torch
from detectron2.structures import Boxes, BoxMode, pairwise_iou

from ..data.dicom import box_size_mm
from .metrics import size_group

__all__ = ["STAGE_PROBS", "match_image", "match_images", "pair_with_records", "size_groups"]

NAN = float("nan")
# Cascade outputs whose malignant probability is also scored on its own (the paper's Table III).
STAGE_PROBS = {"coarse": "coarse_probs", "fine": "fine_probs"}


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


def pair_with_records(predictions, records, dataset_name, notes):
    """[(dataset record, prediction)] per evaluated image, by image_id, else by file name; an
    image evaluated twice counts once. Appends to ``notes`` what was not evaluated."""
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
                f"record in dataset '{dataset_name}'"
            )
        key = (record.get("image_id"), record.get("file_name"))
        if key not in seen:
            seen.add(key)
            images.append((record, pred))
    if len(images) < len(records):
        notes.append(
            f"{len(records) - len(images)} of {len(records)} images of '{dataset_name}' "
            "were not evaluated (no predictions for them)"
        )
    if not images:
        notes.append("empty evaluation: no images")
    return images


def _nodule_dtype(group_by):
    return np.dtype(
        [
            ("image_index", np.int64),
            ("image_id", object),
            ("file_name", object),
            ("box", np.float32, (4,)),  # XYXY, original-image pixels
            ("category", object),  # class name (or the raw category id if unknown)
            ("label", np.int64),  # 1 malignant, 0 benign, -1 no diagnosis
            ("size", np.float64),  # sqrt(width * height) in pixels
            ("size_mm", np.float64),  # equivalent diameter, NaN without calibration
            ("size_group", object),
            ("detected", bool),  # a detection at IoU >= the match IoU
            ("hit50", bool),  # any detection at IoU >= 0.5
            ("iou", np.float64),  # of the matched detection, else the best IoU
            ("score", np.float64),  # of the matched detection; NaN when missed
            ("malignant_prob", np.float64),
            *[(f"{stage}_prob", np.float64) for stage in STAGE_PROBS],  # NaN when absent
            ("prediction", object),  # "malignant" / "benign" / "" (not called)
        ]
        + [(f"group:{field}", object) for field in group_by]
    )


DETECTION_DTYPE = np.dtype(
    [("image_index", np.int64), ("score", np.float64), ("hit", np.int64)]  # hit: nodule row or -1
)


def match_images(images, classes, labels, iou_threshold, group_by=()):
    """Match every image's detections to its (non-crowd) ground-truth nodules.

    Args:
        images: [(record, prediction)] from :func:`pair_with_records`.
        classes (list[str]): the dataset's thing_classes.
        labels (dict or None): {category id: 1 malignant / 0 benign}; None: no diagnosis.
        group_by (list[str]): record (or annotation) fields copied into ``group:<field>``.

    Returns:
        (nodules, detections, stages): the per-nodule and per-detection tables (structured
        arrays; see ``_nodule_dtype`` and ``DETECTION_DTYPE``) and the cascade stages whose
        probabilities some nodule's image carries.
    """
    nodule_rows, detection_rows, stages = [], [], set()
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
            torch.from_numpy(gt), torch.from_numpy(pred["boxes"]), pred["scores"], iou_threshold
        )
        first = len(nodule_rows)
        for score, hit in zip(pred["scores"].tolist(), result["froc_hit"].tolist()):
            detection_rows.append((image_index, score, hit + first if hit >= 0 else -1))
        if annotations:
            stages |= {s for s in STAGE_PROBS if f"{s}_prob" in pred}
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

            def matched(key):
                return float(pred[key][d]) if d >= 0 and key in pred else NAN

            nodule_rows.append(
                (
                    image_index,
                    record.get("image_id"),
                    record.get("file_name"),
                    gt[j],
                    classes[category] if known else category,
                    labels.get(category, -1) if labels is not None else -1,
                    size,
                    physical.get("diameter_mm", NAN),
                    "",  # set by size_groups
                    d >= 0,
                    bool(result["best_iou"][j] >= 0.5),
                    float(result["match_iou"][j] if d >= 0 else result["best_iou"][j]),
                    matched("scores"),
                    matched("malignant_prob"),
                    *[matched(f"{stage}_prob") for stage in STAGE_PROBS],
                    "",  # set once the nodule is called
                    *[ann.get(f, record.get(f)) for f in group_by],
                )
            )
    nodules = np.array(nodule_rows, dtype=_nodule_dtype(group_by))
    detections = np.array(detection_rows, dtype=DETECTION_DTYPE)
    return nodules, detections, [s for s in STAGE_PROBS if s in stages]


def size_groups(nodules, size_edges, size_edges_mm):
    """Fill ``nodules["size_group"]``: by millimetres when every nodule is calibrated, else by
    pixels. Returns the definition used, in words."""
    if len(nodules) and np.isfinite(nodules["size_mm"]).all():
        low, high = size_edges_mm
        nodules["size_group"] = [size_group(s, size_edges_mm) for s in nodules["size_mm"]]
        return (
            "equivalent diameter sqrt(width * height) of the ground-truth box in millimetres "
            f"(DICOM calibration): small < {low:g} mm <= middle < {high:g} mm <= large"
        )
    low, high = size_edges
    nodules["size_group"] = [size_group(s, size_edges) for s in nodules["size"]]
    uncalibrated = int(np.isnan(nodules["size_mm"]).sum())
    why = "" if uncalibrated == len(nodules) else (
        f" ({uncalibrated} nodules lack a physical calibration)"
    )
    return (
        "sqrt(width * height) of the ground-truth box in original-image pixels: "
        f"small < {low:g} <= middle < {high:g} <= large{why}"
    )
