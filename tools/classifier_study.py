#!/usr/bin/env python
"""The paper's classifier study (V-B, VI-A, Fig. 9 and 11): classic classifiers on the refiner's
fc7 features of ground-truth nodule crops, beside the refiner's own softmax.

Examples:
    python tools/classifier_study.py --config-file configs/mccnn.yaml --weights model_final.pth \\
        --dataset tn5000_trainval --test-dataset tn5000_test --output output/classifier_study
    # one set, split 8:2 by image (stratified by "holds a malignant nodule", as the paper)
    python tools/classifier_study.py ... --dataset tn5000_trainval --output out/

Each ground-truth nodule is cropped exactly as the cascade's ROI heads crop a detection at
inference (``RefinerROIHeads.crops``: the test mapper's fixed-size resize, pixel normalisation, a
square context crop of MODEL.REFINER.CONTEXT_MARGIN, resized to MODEL.REFINER.TEST_INPUT_SIZE or
INPUT_SIZE, in the refiner's channels), and passed once through the refiner for its fc7 features
(``refiner.features``) and its softmax (from ``refiner.cls_score`` on those features when the
refiner has one). On the training features, each of nearest neighbour,
k-NN, decision tree, random forest, AdaBoost, Bernoulli naive Bayes and gradient-boosted trees
(scikit-learn's histogram GBDT) is tuned by GridSearchCV (ROC AUC, stratified --cv folds) and
refit; on the test features each is scored, with the refiner's softmax, by accuracy,
sensitivity (malignant recall) and specificity at probability 0.5, and ROC AUC.

Writes to ``--output``: ``classifier_study.json`` (metrics and chosen hyper-parameters),
``classifier_rocs.png`` (all ROC curves in one figure) and the printed table.
"""

import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
import tqdm
from detectron2.modeling import build_model
from sklearn.base import clone
from sklearn.ensemble import (
    AdaBoostClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.naive_bayes import BernoulliNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier
from tabulate import tabulate

import thyroid_det  # noqa: F401  (registers the plugin)
from thyroid_det.data.datasets import kfold_assign
from thyroid_det.data.mapper import SSDDatasetMapper
from thyroid_det.engine import load_inference_weights, setup_cfg_for_weights
from thyroid_det.evaluation.nodule_evaluator import binary_metrics
from thyroid_det.evaluation.plots import plot_roc_curves
from thyroid_det.utils.cli import check_dataset, cli_errors, config_tool_parser
from thyroid_det.utils.file_io import atomic_write_json

logger = logging.getLogger("thyroid_det.classifier_study")

REFINER_NAME = "refiner softmax"


def classifier_grids(seed, quick=False):
    """(name, estimator, parameter grid) of the paper's seven classifiers; ``quick``: one
    small setting each, for tests."""
    scaled_knn = make_pipeline(StandardScaler(), KNeighborsClassifier())
    if quick:
        return [
            ("nearest neighbour", scaled_knn, {"kneighborsclassifier__n_neighbors": [1]}),
            ("k-NN", scaled_knn, {"kneighborsclassifier__n_neighbors": [3]}),
            ("decision tree", DecisionTreeClassifier(random_state=seed), {"max_depth": [3]}),
            ("random forest", RandomForestClassifier(random_state=seed), {"n_estimators": [10]}),
            ("AdaBoost", AdaBoostClassifier(random_state=seed), {"n_estimators": [10]}),
            ("Bernoulli naive Bayes", BernoulliNB(), {"alpha": [1.0]}),
            (
                "gradient-boosted trees",
                HistGradientBoostingClassifier(random_state=seed),
                {"max_iter": [10]},
            ),
        ]
    return [
        (
            "nearest neighbour",
            scaled_knn,
            {
                "kneighborsclassifier__n_neighbors": [1],
                "kneighborsclassifier__metric": ["euclidean", "cosine"],
            },
        ),
        (
            "k-NN",
            scaled_knn,
            {
                "kneighborsclassifier__n_neighbors": [3, 5, 9, 15, 25],
                "kneighborsclassifier__weights": ["uniform", "distance"],
                "kneighborsclassifier__metric": ["euclidean", "cosine"],
            },
        ),
        (
            "decision tree",
            DecisionTreeClassifier(random_state=seed),
            {
                "max_depth": [3, 5, 10, None],
                "min_samples_leaf": [1, 5, 20],
                "criterion": ["gini", "entropy"],
            },
        ),
        (
            "random forest",
            RandomForestClassifier(random_state=seed),
            {
                "n_estimators": [200, 500],
                "max_features": ["sqrt", 0.05],
                "min_samples_leaf": [1, 5],
            },
        ),
        (
            "AdaBoost",
            AdaBoostClassifier(random_state=seed),
            {"n_estimators": [100, 300], "learning_rate": [0.1, 0.5, 1.0]},
        ),
        # fc7 follows a ReLU: binarize=0 reads each unit as "fires or not".
        ("Bernoulli naive Bayes", BernoulliNB(), {"alpha": [0.01, 0.1, 1.0], "binarize": [0.0]}),
        (
            "gradient-boosted trees",
            HistGradientBoostingClassifier(random_state=seed),
            {"learning_rate": [0.05, 0.1], "max_iter": [100, 300], "max_leaf_nodes": [15, 31]},
        ),
    ]


@torch.no_grad()
def extract_features(model, cfg, records, batch_size=8, desc="features"):
    """fc7 features, refiner malignant probabilities and labels of every ground-truth nodule.

    Returns:
        features (N, D) float32, refiner_prob (N,), labels (N,) (1 malignant, 0 benign).
    """
    heads = model.roi_heads
    mapper = SSDDatasetMapper(cfg, is_train=False)
    features, probs, labels = [], [], []
    for start in tqdm.tqdm(range(0, len(records), batch_size), desc=desc, unit="batch"):
        inputs = [mapper(r) for r in records[start : start + batch_size]]
        inputs = [x for x in inputs if "instances" in x and len(x["instances"])]
        if not inputs:
            continue
        images = model.preprocess_image(inputs)
        boxes = [x["instances"].gt_boxes.tensor.to(images.tensor.device) for x in inputs]
        crops = heads.crops(images.tensor, boxes)  # as the cascade crops at inference
        feats = heads.refiner.features(crops)
        # the registry's optional head runs on the features, so the crops pass through once
        head = getattr(heads.refiner, "cls_score", None)
        logits = head(feats) if callable(head) else heads.refiner(crops)
        features.append(feats.float().cpu())
        probs.append(F.softmax(logits.float(), dim=1)[:, 1].cpu())
        labels.append(torch.cat([x["instances"].gt_classes for x in inputs]).cpu())
    if not features:
        return np.zeros((0, 0), np.float32), np.zeros(0), np.zeros(0, np.int64)
    labels = torch.cat(labels).numpy()
    keep = (labels == 0) | (labels == 1)
    return torch.cat(features).numpy()[keep], torch.cat(probs).numpy()[keep], labels[keep]


def scores(y_true, y_prob):
    m = binary_metrics(y_true, y_prob, 0.5)
    auc = float(roc_auc_score(y_true, y_prob)) if len(np.unique(y_true)) == 2 else float("nan")
    return {
        "accuracy": m["accuracy"],
        "sensitivity": m["sensitivity"],
        "specificity": m["specificity"],
        "auc": auc,
    }


def split_records(dataset, test_dataset, seed):
    """(train, test) records: two datasets, or one split 8:2 by image, stratified."""
    records = check_dataset(dataset)
    if test_dataset:
        return records, check_dataset(test_dataset)
    folds = kfold_assign(records, k=5, seed=seed)
    return [r for r, f in zip(records, folds) if f != 0], [
        r for r, f in zip(records, folds) if f == 0
    ]


def build_parser():
    parser = config_tool_parser(__doc__, config_help="an MCCNN config")
    parser.add_argument("--weights", required=True, metavar="FILE")
    parser.add_argument(
        "--dataset", required=True, help="training set (split 8:2 without --test-dataset)"
    )
    parser.add_argument("--test-dataset")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument("--cv", type=int, default=3, help="GridSearchCV folds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="GridSearchCV parallel jobs")
    parser.add_argument(
        "--quick", action="store_true", help="one small setting per classifier (tests)"
    )
    return parser


@cli_errors("classifier_study.py")
def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = setup_cfg_for_weights(args, "classifier_study.py")
    model = build_model(cfg)
    if not hasattr(getattr(model, "roi_heads", None), "refiner"):
        raise SystemExit(
            f"classifier_study.py: error: {cfg.MODEL.META_ARCHITECTURE} has no refiner; "
            "use an MCCNN config"
        )
    load_inference_weights(model, cfg.MODEL.WEIGHTS)
    model.eval()

    train_records, test_records = split_records(args.dataset, args.test_dataset, args.seed)
    x_train, refiner_train, y_train = extract_features(
        model, cfg, train_records, desc="train features"
    )
    x_test, refiner_test, y_test = extract_features(model, cfg, test_records, desc="test features")
    for name, y in (("training", y_train), ("test", y_test)):
        if len(np.unique(y)) < 2:
            raise SystemExit(
                f"classifier_study.py: error: the {name} nodules hold {len(y)} boxes of "
                f"{len(np.unique(y))} class(es); both benign and malignant are needed"
            )
    cv_folds = min(args.cv, int(np.bincount(y_train).min()))
    if cv_folds < 2:
        raise SystemExit(
            "classifier_study.py: error: too few nodules of one class for a cross-validated "
            "grid search"
        )
    cv = StratifiedKFold(n_splits=cv_folds, shuffle=True, random_state=args.seed)

    results = {REFINER_NAME: dict(scores(y_test, refiner_test), best_params={})}
    curves = [(REFINER_NAME, y_test, refiner_test)]
    for name, estimator, grid in classifier_grids(args.seed, args.quick):
        logger.info(f"grid search: {name} over {grid}")
        search = GridSearchCV(
            clone(estimator), grid, scoring="roc_auc", cv=cv, n_jobs=args.jobs, refit=True
        )
        search.fit(x_train, y_train)
        prob = search.predict_proba(x_test)[:, list(search.classes_).index(1)]
        results[name] = dict(
            scores(y_test, prob), best_params=search.best_params_, cv_auc=search.best_score_
        )
        curves.append((name, y_test, prob))

    os.makedirs(args.output, exist_ok=True)
    report = {
        "config_file": args.config_file,
        "weights": args.weights,
        "train": {
            "dataset": args.dataset,
            "nodules": len(y_train),
            "malignant": int(y_train.sum()),
        },
        "test": {
            "dataset": args.test_dataset or f"{args.dataset} (fold 0 of 5, seed {args.seed})",
            "nodules": len(y_test),
            "malignant": int(y_test.sum()),
        },
        "feature_dim": int(x_train.shape[1]),
        "results": results,
    }
    atomic_write_json(os.path.join(args.output, "classifier_study.json"), report)
    plot_roc_curves(
        curves, os.path.join(args.output, "classifier_rocs.png"), title="ROC on fc7 features"
    )
    rows = [
        [name] + [f"{r[k]:.3f}" for k in ("accuracy", "sensitivity", "specificity", "auc")]
        for name, r in results.items()
    ]
    print(f"train: {len(y_train)} nodules, test: {len(y_test)} nodules, fc7 dim {x_train.shape[1]}")
    print(
        tabulate(
            rows,
            headers=["classifier", "accuracy", "sensitivity", "specificity", "auc"],
            tablefmt="pipe",
        )
    )
    return report


if __name__ == "__main__":
    main()
