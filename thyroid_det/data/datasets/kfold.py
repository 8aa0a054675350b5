"""Stratified k-fold splits of dataset dicts for the paper's 5-fold cross-validation (VI-A)."""
import functools
import warnings

import numpy as np
from sklearn.model_selection import StratifiedKFold
from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["FoldCountError", "kfold_assign", "kfold_splits", "register_kfold_datasets"]


class FoldCountError(ValueError):
    """A number of folds the records cannot fill: a user's choice, reported on one line."""


def kfold_assign(records, k=5, seed=0, positive_class=1):
    """
    The fold (0..k-1) of each record, stratified by whether it holds a ``positive_class`` box
    (sklearn's ``StratifiedKFold``, shuffled with ``seed``).

    Each record is one unit: pass merged records (as :func:`load_tn5000` returns) so that
    copies of an image and all boxes of an image stay in one fold. The result depends only on
    the set of records (they are ordered by ``image_id`` and ``file_name`` first), ``k`` and
    ``seed``; fold sizes, and the positives in each fold, differ by at most one.

    Returns:
        list[int]: the fold of ``records[i]``.

    Raises:
        FoldCountError: ``k`` < 2 or more folds than records.
    """
    if not 2 <= k <= len(records):
        raise FoldCountError(
            f"{k} folds of {len(records)} images: k-fold needs 2 <= k <= the number of images"
        )
    order = sorted(
        range(len(records)),
        key=lambda i: (str(records[i].get("image_id")), records[i]["file_name"]),
    )
    positive = np.array(
        [
            any(a["category_id"] == positive_class for a in records[i].get("annotations", []))
            for i in order
        ]
    )
    # sklearn refuses when both strata are smaller than k: then the records are one stratum.
    if max(positive.sum(), len(positive) - positive.sum()) < k:
        positive = np.zeros_like(positive)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = [0] * len(records)
    with warnings.catch_warnings():  # a stratum smaller than k: some folds lack it, as intended
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, val) in enumerate(splitter.split(np.zeros(len(order)), positive)):
            for j in val:
                folds[order[j]] = fold
    return folds


def kfold_splits(records, k=5, seed=0, positive_class=1):
    """
    Split records into k (train, val) pairs; see :func:`kfold_assign` for the rule.

    Returns:
        list[tuple[list[dict], list[dict]]]: for fold i, the records outside it (train) and in
        it (val), each in the input order. The k val lists partition ``records``.
    """
    folds = kfold_assign(records, k, seed, positive_class)
    return [
        (
            [r for r, f in zip(records, folds) if f != i],
            [r for r, f in zip(records, folds) if f == i],
        )
        for i in range(k)
    ]


def register_kfold_datasets(name, k=5, seed=0):
    """
    Register ``{name}_fold{i}_train`` and ``{name}_fold{i}_val`` for i < k, built lazily from
    the registered dataset ``name``; its class metadata is copied when a fold is registered and
    again when it is loaded (COCO data sets learn their classes on load).

    Returns:
        list[tuple[str, str]]: the (train, val) names of each fold.
    """
    names = []
    for i in range(k):
        pair = (f"{name}_fold{i}_train", f"{name}_fold{i}_val")
        for part, fold_name in enumerate(pair):
            if fold_name in DatasetCatalog.list():
                continue
            DatasetCatalog.register(
                fold_name, functools.partial(_load_fold, name, k, seed, i, part, fold_name)
            )
            _copy_metadata(name, fold_name)
        names.append(pair)
    return names


def _load_fold(name, k, seed, i, part, fold_name):
    records = kfold_splits(DatasetCatalog.get(name), k, seed)[i][part]
    _copy_metadata(name, fold_name)
    return records


def _copy_metadata(src, dst):
    base, meta = MetadataCatalog.get(src), MetadataCatalog.get(dst)
    for key in ("thing_classes", "thing_dataset_id_to_contiguous_id", "evaluator_type"):
        if base.get(key) is not None and meta.get(key) is None:
            meta.set(**{key: base.get(key)})
