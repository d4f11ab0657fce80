"""Downstream metrics (paper 4.4, Table 1). Pure: numpy arrays in, floats out; sklearn underneath.

The ``*_metrics`` functions return columns named as in the paper's Table 1, in the paper's units:
accuracy, weighted F1, mAP and AUC in percent; MSE multiplied by 100 ("MSE is multiplied by 10^2");
R^2 as is. The plain functions (``accuracy``, ``weighted_f1``, ...) return fractions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)
from sklearn.neighbors import KNeighborsClassifier

# Which way is better, for model selection and for bolding: +1 higher, -1 lower.
DIRECTION = {"Acc": 1, "F1": 1, "mAP": 1, "AUC": 1, "MSE": -1, "R2": 1}


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of exact matches; ``y_true``, ``y_pred`` int [N]."""
    return float(accuracy_score(y_true, y_pred))


def weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Per-class F1 averaged with weights = true class support (sklearn ``average="weighted"``)."""
    return float(f1_score(y_true, y_pred, average="weighted", zero_division=0))


def _scorable_columns(y_true: np.ndarray, need_negative: bool) -> np.ndarray:
    """Categories with at least one positive (and one negative, for AUC) in ``y_true``."""
    positives = y_true.sum(axis=0)
    keep = positives > 0
    if need_negative:
        keep &= positives < y_true.shape[0]
    return np.flatnonzero(keep)


def mean_average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Macro mAP over categories: mean of per-category average precision.

    ``y_true`` {0,1} [N, C], ``scores`` float [N, C]. Categories with no positive in ``y_true`` have
    no defined AP and are left out of the mean (as sklearn's macro average would score them 0).
    """
    y_true, scores = _as_2d(y_true), _as_2d(scores)
    cols = _scorable_columns(y_true, need_negative=False)
    if cols.size == 0:
        return float("nan")
    return float(np.mean([average_precision_score(y_true[:, c], scores[:, c]) for c in cols]))


def macro_roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Macro ROC-AUC over categories that have both positives and negatives in ``y_true``."""
    y_true, scores = _as_2d(y_true), _as_2d(scores)
    cols = _scorable_columns(y_true, need_negative=True)
    if cols.size == 0:
        return float("nan")
    return float(np.mean([roc_auc_score(y_true[:, c], scores[:, c]) for c in cols]))


def mean_mse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean over dimensions of each dimension's MSE; [N, D] arrays."""
    return float(mean_squared_error(_as_2d(y_true), _as_2d(y_pred), multioutput="uniform_average"))


def mean_r2(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean over dimensions of each dimension's coefficient of determination R^2."""
    return float(r2_score(_as_2d(y_true), _as_2d(y_pred), multioutput="uniform_average"))


def _as_2d(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    return array[:, None] if array.ndim == 1 else array


# --------------------------------------------------------------------------- Table 1 columns


def single_label_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, float]:
    """``{"Acc-C": %, "F1-C": %}`` for integer labels [N] and predictions [N]."""
    return {
        f"Acc-{num_classes}": 100.0 * accuracy(y_true, y_pred),
        f"F1-{num_classes}": 100.0 * weighted_f1(y_true, y_pred),
    }


def level_names(out_dims: Sequence[int]) -> list[str]:
    """Column suffixes per level: the class count, disambiguated when two levels share it."""
    names = [str(n) for n in out_dims]
    return [f"{n}.L{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def hierarchical_metrics(y_true: np.ndarray, y_pred: np.ndarray, out_dims: Sequence[int]) -> dict[str, float]:
    """Accuracy and weighted F1 per level; ``y_true``, ``y_pred`` int [N, L]."""
    out = {}
    for level, suffix in enumerate(level_names(out_dims)):
        out[f"Acc-{suffix}"] = 100.0 * accuracy(y_true[:, level], y_pred[:, level])
        out[f"F1-{suffix}"] = 100.0 * weighted_f1(y_true[:, level], y_pred[:, level])
    return out


def multilabel_metrics(y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """``{"mAP": %, "AUC": %}``, macro over categories; ``y_true`` {0,1} [N, C], ``scores`` [N, C]."""
    return {"mAP": 100.0 * mean_average_precision(y_true, scores), "AUC": 100.0 * macro_roc_auc(y_true, scores)}


def vad_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """``{"MSE": mean MSE x 100, "R2": mean R^2}`` over the three VAD dimensions; [N, 3]."""
    return {"MSE": 100.0 * mean_mse(y_true, y_pred), "R2": mean_r2(y_true, y_pred)}


def task_metrics(kind: str, y_true: np.ndarray, outputs: np.ndarray, out_dims: Sequence[int]) -> dict[str, float]:
    """Table 1 columns for a task kind. ``outputs`` are predictions: class indices for single [N]
    and hierarchical [N, L], scores for multilabel [N, C], values for vad [N, 3]."""
    if kind == "single":
        return single_label_metrics(y_true, outputs, out_dims[0])
    if kind == "hierarchical":
        return hierarchical_metrics(y_true, outputs, out_dims)
    if kind == "multilabel":
        return multilabel_metrics(y_true, outputs)
    if kind == "vad":
        return vad_metrics(y_true, outputs)
    raise ValueError(f"unknown task kind {kind!r}")


def selection_score(kind: str, metrics: dict[str, float]) -> float:
    """One number to maximise for model selection on validation: mean accuracy over levels
    (single, hierarchical), mAP (multilabel), or -MSE (vad)."""
    if kind in ("single", "hierarchical"):
        return float(np.mean([v for k, v in metrics.items() if k.startswith("Acc-")]))
    if kind == "multilabel":
        return metrics["mAP"]
    if kind == "vad":
        return -metrics["MSE"]
    raise ValueError(f"unknown task kind {kind!r}")


def metric_direction(column: str) -> int:
    """+1 when higher is better for a Table 1 column (``"Acc-8"``, ``"MSE"``, ...), -1 when lower."""
    return DIRECTION.get(column.split("-", 1)[0], 1)


# --------------------------------------------------------------------------- kNN probe


def knn_accuracy(bank_x: np.ndarray, bank_y: np.ndarray, query_x: np.ndarray, query_y: np.ndarray, k: int) -> float:
    """Accuracy (a fraction) of a cosine k-nearest-neighbour vote: each query takes the label most
    frequent among the ``k`` bank rows of highest cosine similarity (ties between labels go to the
    smallest label; ``k`` is capped at the bank size). sklearn's brute-force
    ``KNeighborsClassifier(metric="cosine")``; the training stage's validation probe
    (:mod:`pacl_ray.stages.validation`; issue 20: a signal comparable across trials).

    Args:
        bank_x: float [M, D] labelled features; bank_y: int [M] or [M, L] (one label per level).
        query_x: float [N, D]; query_y: int [N] or [N, L].
        k: neighbours (>= 1).
    Returns:
        Mean over queries (and over levels for [.., L] labels) of a correct vote.
    Raises:
        ValueError: an empty bank or query set, k < 1, or mismatched shapes.
    """
    bank_x, query_x = np.asarray(bank_x, dtype=np.float64), np.asarray(query_x, dtype=np.float64)
    bank_y, query_y = np.asarray(bank_y), np.asarray(query_y)
    if k < 1:
        raise ValueError(f"knn_accuracy: k must be >= 1, got {k}")
    if len(bank_x) == 0 or len(query_x) == 0:
        raise ValueError(f"knn_accuracy: needs a non-empty bank and query set, got {len(bank_x)} and {len(query_x)}")
    if bank_x.ndim != 2 or query_x.shape[1:] != bank_x.shape[1:] or len(bank_y) != len(bank_x) \
            or len(query_y) != len(query_x) or bank_y.shape[1:] != query_y.shape[1:]:
        raise ValueError(f"knn_accuracy: shapes do not match: bank {bank_x.shape} / {bank_y.shape}, "
                         f"query {query_x.shape} / {query_y.shape}")
    probe = KNeighborsClassifier(n_neighbors=min(int(k), len(bank_x)), metric="cosine", algorithm="brute")
    predicted = probe.fit(bank_x, bank_y).predict(query_x)
    return float(np.mean(predicted.reshape(query_y.shape) == query_y))
