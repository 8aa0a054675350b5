"""ROC, FROC and reliability figures, drawn on matplotlib's Agg canvas (no display, no global
backend)."""

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from ..utils.file_io import atomic_path


def _label_axes(ax, xlabel, ylabel, title):
    """The axes' labels, title, legend (lower right) and grid, and the y range [0, 1]."""
    ax.set_ylim(0, 1.01)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)


def _save(fig, path):
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_roc_curves(curves, path, title="ROC"):
    """Draw several ROC curves in one PNG.

    Args:
        curves (list[tuple]): ``(label, y_true, y_score)`` per curve; a curve whose ``y_true``
            holds only one class has no ROC and is listed in the legend as undefined.
        path (str): the PNG to write.
        title (str): the figure title.
    """
    fig = Figure(figsize=(5.5, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
    for label, y_true, y_score in curves:
        y_true = np.asarray(y_true)
        if len(np.unique(y_true)) < 2:
            ax.plot([], [], label=f"{label} (AUC undefined: one class)")
            continue
        fpr, tpr, _ = roc_curve(y_true, y_score)
        auc = roc_auc_score(y_true, y_score)
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{label} (AUC {auc:.3f})")
    ax.set_xlim(0, 1)
    _label_axes(
        ax, "1 - specificity (false positive rate)", "sensitivity (true positive rate)", title
    )
    _save(fig, path)


def plot_froc_curves(curves, path, fp_rates, title="FROC"):
    """Draw FROC curves (detection sensitivity against false positives per image) in one PNG.

    Args:
        curves (list[tuple]): ``(label, fppi, sensitivity)`` per curve: the operating points.
        path (str): the PNG to write.
        fp_rates (list[float]): the reported false-positive rates, marked on the x axis.
        title (str): the figure title.
    """
    fig = Figure(figsize=(6.0, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    for label, fppi, sensitivity in curves:
        fppi = np.asarray(fppi, dtype=float)
        sensitivity = np.asarray(sensitivity, dtype=float)
        if len(fppi) == 0 or not np.isfinite(sensitivity).any():
            ax.plot([], [], label=f"{label} (undefined)")
            continue
        ax.step(np.clip(fppi, min(fp_rates) / 2, None), sensitivity, where="post", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(fp_rates)
    ax.set_xticklabels([f"{r:g}" for r in fp_rates])
    ax.set_xlim(min(fp_rates) / 2, max(fp_rates) * 1.5)
    _label_axes(ax, "false positives per image", "detection sensitivity", title)
    _save(fig, path)


def plot_reliability_diagram(curves, path, title="Reliability"):
    """Draw reliability diagrams (fraction malignant against mean predicted probability, per
    probability bin) in one PNG, with the bins' nodule counts as a histogram below.

    Args:
        curves (list[tuple]): ``(label, mean_predicted, fraction_positive, counts)`` per curve,
            as :func:`thyroid_det.evaluation.calibration.reliability_curve` returns; put the
            ECE in the label.
        path (str): the PNG to write.
        title (str): the figure title.
    """
    fig = Figure(figsize=(5.5, 6.0))
    ax = fig.add_axes([0.13, 0.35, 0.82, 0.57])
    hist = fig.add_axes([0.13, 0.08, 0.82, 0.18], sharex=ax)
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1, label="perfectly calibrated")
    for label, predicted, observed, counts in curves:
        line = ax.plot(predicted, observed, marker="o", markersize=4, linewidth=1.5, label=label)
        hist.bar(predicted, counts, width=0.03, alpha=0.6, color=line[0].get_color())
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_ylabel("fraction malignant")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax.tick_params(labelbottom=False)
    hist.set_xlabel("predicted malignant probability (bin mean)")
    hist.set_ylabel("nodules")
    hist.grid(alpha=0.3)
    _save(fig, path)
