"""Metrics against values computed by hand on tiny cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pacl_ray.core import metrics


def test_accuracy_and_weighted_f1_by_hand():
    y_true = np.array([0, 0, 0, 1])
    y_pred = np.array([0, 0, 1, 1])
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(0.75)
    # class 0: P=1, R=2/3 -> F1=0.8 (support 3); class 1: P=1/2, R=1 -> F1=2/3 (support 1)
    assert metrics.weighted_f1(y_true, y_pred) == pytest.approx((3 * 0.8 + 1 * 2 / 3) / 4)


def test_single_label_metrics_columns_in_percent():
    out = metrics.single_label_metrics(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]), num_classes=3)
    assert set(out) == {"Acc-3", "F1-3"}
    assert out["Acc-3"] == pytest.approx(75.0)
    # class 0: F1 1 (support 1); class 1: P=1/2 R=1 -> 2/3 (support 1); class 2: P=1 R=1/2 -> 2/3 (support 2)
    assert out["F1-3"] == pytest.approx(100 * (1 + 2 / 3 + 2 * 2 / 3) / 4)


def test_hierarchical_metrics_per_level():
    y_true = np.array([[0, 1], [1, 2], [1, 0], [0, 1]])
    y_pred = np.array([[0, 1], [1, 0], [0, 0], [0, 1]])
    out = metrics.hierarchical_metrics(y_true, y_pred, out_dims=[2, 3])
    assert list(out) == ["Acc-2", "F1-2", "Acc-3", "F1-3"]
    assert out["Acc-2"] == pytest.approx(75.0)
    assert out["Acc-3"] == pytest.approx(75.0)
    # level 1: class 0 P=2/3 R=1 F1=0.8 (support 2); class 1 P=1 R=1/2 F1=2/3 (support 2)
    assert out["F1-2"] == pytest.approx(100 * (0.8 + 2 / 3) / 2)


def test_level_names_disambiguate_equal_class_counts():
    assert metrics.level_names([2, 6, 25]) == ["2", "6", "25"]
    assert metrics.level_names([2, 2]) == ["2.L1", "2.L2"]


def test_map_and_auc_macro_by_hand():
    y_true = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.2, 0.5], [0.7, 0.3, 0.5], [0.1, 0.4, 0.5]])
    # category 0: ranking pos, neg, pos, neg -> AP = (1 + 2/3) / 2; AUC = 3 of 4 pairs ordered
    # category 1: its only positive ranks third -> AP = 1/3; AUC = 1/3
    # category 2: no positives -> left out of both means
    assert metrics.mean_average_precision(y_true, scores) == pytest.approx(((1 + 2 / 3) / 2 + 1 / 3) / 2)
    assert metrics.macro_roc_auc(y_true, scores) == pytest.approx((0.75 + 1 / 3) / 2)
    out = metrics.multilabel_metrics(y_true, scores)
    assert out["mAP"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1 / 3) / 2)
    assert out["AUC"] == pytest.approx(100 * (0.75 + 1 / 3) / 2)


def test_map_nan_when_no_category_scorable():
    assert math.isnan(metrics.mean_average_precision(np.zeros((3, 2)), np.ones((3, 2))))
    assert math.isnan(metrics.macro_roc_auc(np.ones((3, 2)), np.ones((3, 2))))


def test_vad_mean_mse_and_r2_by_hand():
    y_true = np.array([[0.0, 0.0, 1.0], [1.0, 2.0, 3.0]])
    y_pred = np.array([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    # dim 0 perfect: MSE 0, R2 1; dim 1: MSE 1, SS_res 2 = SS_tot 2 -> R2 0; dim 2: MSE 2, R2 1 - 4/2 = -1
    assert metrics.mean_mse(y_true, y_pred) == pytest.approx(1.0)
    assert metrics.mean_r2(y_true, y_pred) == pytest.approx(0.0)
    assert metrics.vad_metrics(y_true, y_pred) == pytest.approx({"MSE": 100.0, "R2": 0.0})


def test_task_metrics_dispatch_and_selection():
    single = metrics.task_metrics("single", np.array([0, 1]), np.array([0, 0]), [2])
    assert metrics.selection_score("single", single) == pytest.approx(50.0)
    hier = metrics.task_metrics("hierarchical", np.array([[0, 0], [1, 1]]), np.array([[0, 0], [1, 0]]), [2, 3])
    assert metrics.selection_score("hierarchical", hier) == pytest.approx((100 + 50) / 2)
    vad = metrics.task_metrics("vad", np.zeros((2, 3)), np.ones((2, 3)), [3])
    assert metrics.selection_score("vad", vad) == pytest.approx(-100.0)
    with pytest.raises(ValueError, match="unknown task kind"):
        metrics.task_metrics("bogus", np.zeros(2), np.zeros(2), [2])


def test_metric_direction():
    assert metrics.metric_direction("Acc-8") == 1
    assert metrics.metric_direction("MSE") == -1
    assert metrics.metric_direction("R2") == 1


# --------------------------------------------------------------------------- kNN probe


def _knn_by_loops(bank_x, bank_y, query_x, query_y, k) -> float:
    """Brute force: cosine similarity to every bank row, the k most similar, majority vote with
    ties to the smallest label; accuracy per query and level."""
    bank_y, query_y = np.asarray(bank_y).reshape(len(bank_x), -1), np.asarray(query_y).reshape(len(query_x), -1)
    correct, total = 0, 0
    for q, labels in zip(query_x, query_y):
        sims = []
        for i, b in enumerate(bank_x):
            sims.append((sum(x * y for x, y in zip(q, b)) / (math.sqrt(sum(x * x for x in q)) * math.sqrt(sum(y * y for y in b))), i))
        sims.sort(key=lambda s: -s[0])
        nearest = [i for _, i in sims[:min(k, len(bank_x))]]
        for level, label in enumerate(labels):
            votes: dict[int, int] = {}
            for i in nearest:
                votes[int(bank_y[i, level])] = votes.get(int(bank_y[i, level]), 0) + 1
            best = max(votes.values())
            correct += min(c for c, n in votes.items() if n == best) == label
            total += 1
    return correct / total


@pytest.mark.parametrize("k", [1, 3, 4, 50])  # even k has vote ties; 50 > the bank: every row votes
@pytest.mark.parametrize("levels", [0, 2])
def test_knn_accuracy_matches_a_brute_force_vote(k, levels):
    rng = np.random.default_rng(k + levels)
    bank_x, query_x = rng.normal(size=(23, 5)), rng.normal(size=(17, 5))
    shape = lambda n: (n, levels) if levels else (n,)  # noqa: E731
    bank_y, query_y = rng.integers(0, 3, shape(23)), rng.integers(0, 3, shape(17))
    got = metrics.knn_accuracy(bank_x, bank_y, query_x, query_y, k)
    assert got == pytest.approx(_knn_by_loops(bank_x, bank_y, query_x, query_y, k), abs=1e-12)
    # cosine: scaling a row changes nothing
    assert metrics.knn_accuracy(bank_x * rng.uniform(0.1, 9, (23, 1)), bank_y, query_x * 7, query_y, k) == got


def test_knn_accuracy_separable_and_errors():
    bank_x = np.array([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]])
    bank_y = np.array([0, 0, 1, 1])
    assert metrics.knn_accuracy(bank_x, bank_y, np.array([[2.0, 0.0], [0.0, 3.0]]), np.array([0, 1]), 2) == 1.0
    assert metrics.knn_accuracy(bank_x, bank_y, np.array([[2.0, 0.0], [0.0, 3.0]]), np.array([1, 0]), 2) == 0.0
    with pytest.raises(ValueError, match="k must be >= 1"):
        metrics.knn_accuracy(bank_x, bank_y, bank_x, bank_y, 0)
    with pytest.raises(ValueError, match="non-empty bank"):
        metrics.knn_accuracy(bank_x[:0], bank_y[:0], bank_x, bank_y, 1)
    with pytest.raises(ValueError, match="shapes do not match"):
        metrics.knn_accuracy(bank_x, bank_y[:3], bank_x, bank_y, 1)
