"""Classification metrics and calibration for the severity classifier (NumPy, host side).

Accuracy, macro-F1 and the confusion matrix; NLL, Brier score and expected calibration error;
temperature scaling fitted by NLL; and a reliability diagram.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sevjax.loss import SEVERITIES


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax of [N, C] logits in float64."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def label_metrics(y: np.ndarray, pred: np.ndarray, num_classes: int = 3) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    Args:
        y: [N] int gold classes; pred: [N] int predicted classes.

    Returns:
        See :func:`confusion_metrics`.
    """
    y, pred = np.asarray(y, np.int64), np.asarray(pred, np.int64)
    conf = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(conf, (y, pred), 1)
    return confusion_metrics(conf)


def confusion_metrics(conf: np.ndarray) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class P/R/F1 from a confusion matrix (rows gold, cols predicted).

    Returns:
        ``{"accuracy", "macro_f1", "per_class": {name: {precision, recall, f1, support}},
        "confusion": [[int]]}``; an empty class scores 0.
    """
    conf = np.rint(np.asarray(conf, np.float64)).astype(np.int64)
    num_classes = conf.shape[0]
    tp = np.diag(conf).astype(np.float64)
    precision = np.divide(tp, conf.sum(0), out=np.zeros_like(tp), where=conf.sum(0) > 0)
    recall = np.divide(tp, conf.sum(1), out=np.zeros_like(tp), where=conf.sum(1) > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    names = SEVERITIES if num_classes == 3 else tuple(map(str, range(num_classes)))
    return {
        "accuracy": float(tp.sum() / max(conf.sum(), 1)),
        "macro_f1": float(f1.mean()),
        "per_class": {
            n: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for n, p, r, f, s in zip(names, precision, recall, f1, conf.sum(1))
        },
        "confusion": conf.tolist(),
    }


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE: bin-weighted |accuracy - confidence| over ``bins`` equal-width confidence bins."""
    conf, correct = probs.max(-1), (probs.argmax(-1) == y).astype(np.float64)
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def prob_metrics(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> dict[str, Any]:
    """:func:`label_metrics` of the argmax plus NLL, Brier score (sum over classes) and ECE."""
    probs, y = np.asarray(probs, np.float64), np.asarray(y, np.int64)
    onehot = np.eye(probs.shape[1])[y]
    out = label_metrics(y, probs.argmax(-1), probs.shape[1])
    out["nll"] = float(-np.mean(np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12))))
    out["brier"] = float(np.mean(np.sum((probs - onehot) ** 2, -1)))
    out["ece"] = expected_calibration_error(probs, y, bins)
    return out


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The softmax temperature minimizing NLL: grid over log T in [-3, 3], then a finer grid."""

    def nll(log_t: float) -> float:
        p = softmax(np.asarray(logits, np.float64) / np.exp(log_t))
        return float(-np.mean(np.log(np.maximum(p[np.arange(len(y)), y], 1e-300))))

    grid = np.linspace(-3.0, 3.0, 121)
    best = grid[int(np.argmin([nll(t) for t in grid]))]
    fine = np.linspace(best - 0.05, best + 0.05, 41)
    return float(np.exp(fine[int(np.argmin([nll(t) for t in fine]))]))


def majority_baseline(train_labels: np.ndarray, y: np.ndarray) -> float:
    """Macro-F1 on ``y`` of always predicting the most frequent training class."""
    majority = int(np.bincount(train_labels, minlength=3).argmax())
    return label_metrics(y, np.full_like(y, majority))["macro_f1"]


def reliability_diagram(curves: dict[str, tuple], path: Path, bins: int = 15) -> None:
    """PNG: per split, accuracy per confidence bin before / after temperature scaling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4.5), squeeze=False)
    edges = np.linspace(0, 1, bins + 1)
    for ax, (split, (raw, cal, y)) in zip(axes[0], curves.items()):
        for probs, label, offset in ((raw, "raw", -0.25), (cal, "temperature-scaled", 0.25)):
            conf, correct = probs.max(-1), probs.argmax(-1) == y
            which = np.minimum((conf * bins).astype(int), bins - 1)
            acc = [correct[which == b].mean() if (which == b).any() else 0 for b in range(bins)]
            ece = expected_calibration_error(probs, y, bins)
            label = f"{label} (ECE {ece:.3f})"
            ax.bar(edges[:-1] + (0.5 + offset) / bins, acc, width=0.5 / bins, label=label)
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(title=split, xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
