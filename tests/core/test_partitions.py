"""pacl_ray.core.partitions: calibrations, thresholds and partition codes against hand-computed cases."""

import numpy as np
import pytest

from pacl_ray.core.partitions import (
    assign_partitions,
    calibrate,
    confusion_matrix,
    partition_codes,
    partition_counts,
    percentile_rank,
)


def test_partition_codes_follow_the_spec_table():
    # (factual matched, emotional matched) -> code, SPEC "Partitions"
    assert partition_codes([True, False, True, False], [True, True, False, False]).tolist() == [1, 2, 3, 4]
    assert partition_codes([True], [True]).dtype == np.int8


def test_raw_and_clipscore():
    cos = [-0.2, 0.0, 0.1, 0.28, 0.4]
    np.testing.assert_allclose(calibrate(cos, "raw"), cos)
    np.testing.assert_allclose(calibrate(cos, "clipscore"), [0.0, 0.0, 0.25, 0.7, 1.0])


def test_rank_is_weak_percentile_with_ties():
    # sorted: 0.1, 0.2, 0.2, 0.5 -> #{<= x} / 4
    np.testing.assert_allclose(percentile_rank([0.5, 0.2, 0.1, 0.2]), [1.0, 0.75, 0.25, 0.75])
    np.testing.assert_allclose(calibrate([3.0], "rank"), [1.0])
    assert calibrate([], "rank").size == 0


def test_rank_matches_brute_force():
    x = np.random.default_rng(0).normal(size=50).round(1)  # rounding makes ties
    brute = np.array([(x <= v).mean() for v in x])
    np.testing.assert_allclose(percentile_rank(x), brute)


def test_unknown_calibration_and_non_finite_scores():
    with pytest.raises(ValueError, match="unknown calibration"):
        calibrate([0.1], "zscore")
    with pytest.raises(ValueError, match="index 1"):
        calibrate([0.1, np.nan], "raw")


def test_assign_hand_case_clipscore():
    # clipscore: factual 2.5*[0.3, 0.2, 0.35, 0.1] = [0.75, 0.5, 0.875, 0.25]
    #            emotional 2.5*[0.4, 0.3, 0.1, 0.2] = [1.0, 0.75, 0.25, 0.5]
    factual = [0.3, 0.2, 0.35, 0.1]
    emotional = [0.4, 0.3, 0.1, 0.2]
    codes = assign_partitions(factual, emotional, 0.7, 0.7)
    assert codes.tolist() == [1, 2, 3, 4]
    # "matched" is strictly greater: cos 0.25 -> clipscore exactly 0.625 (binary-exact) is NOT matched
    assert assign_partitions([0.25], [0.4], 0.625, 0.625).tolist() == [2]


def test_assign_mixed_calibrations_and_separate_sigmas():
    factual = [0.1, 0.2, 0.3, 0.4]  # rank: 0.25, 0.5, 0.75, 1.0
    emotional = [0.9, 0.1, 0.5, 0.0]  # raw
    # factual > 0.5: F F T T ; emotional > 0.3: T F T F
    codes = assign_partitions(factual, emotional, 0.5, 0.3, factual_calibration="rank", emotional_calibration="raw")
    assert codes.tolist() == [2, 4, 1, 3]


@pytest.mark.parametrize("calibration", ["raw", "clipscore", "rank"])
def test_sigma_zero_and_one_edges(calibration):
    factual = np.array([0.05, 0.2, 0.3, 0.35])
    emotional = np.array([0.1, 0.15, 0.25, 0.45])
    cal = {"factual_calibration": calibration, "emotional_calibration": calibration}
    # every positive score is > 0 on all three scales (rank is always > 0): all strong-coupled
    assert assign_partitions(factual, emotional, 0.0, 0.0, **cal).tolist() == [1, 1, 1, 1]
    # raw cosines and ranks never exceed 1; clipscore exceeds 1 only for cos > 0.4
    expected = {"raw": [4, 4, 4, 4], "rank": [4, 4, 4, 4], "clipscore": [4, 4, 4, 2]}[calibration]
    assert assign_partitions(factual, emotional, 1.0, 1.0, **cal).tolist() == expected


def test_counts_and_confusion():
    assert partition_counts([1, 1, 4, 2]) == {1: 2, 2: 1, 3: 0, 4: 1}
    matrix = confusion_matrix([1, 2, 2, 4, 0], [1, 2, 3, 4, 1])  # planted 0 = unknown, skipped
    expected = np.zeros((4, 4), dtype=int)
    expected[0, 0] = expected[1, 1] = expected[1, 2] = expected[3, 3] = 1
    np.testing.assert_array_equal(matrix, expected)


# --------------------------------------------------------------------------- one-score partitions (paper Table 4)


def test_one_score_partitions_mark_the_other_score_matched_for_every_pair():
    rng = np.random.default_rng(1)
    factual, emotional = rng.uniform(-0.2, 0.5, 200), rng.uniform(-0.2, 0.5, 200)
    both = assign_partitions(factual, emotional, 0.7, 0.6)
    f_only = assign_partitions(factual, emotional, 0.7, 0.6, use_scores="factual")
    e_only = assign_partitions(factual, emotional, 0.7, 0.6, use_scores="emotional")
    f_matched, e_matched = 2.5 * np.maximum(factual, 0) > 0.7, 2.5 * np.maximum(emotional, 0) > 0.6
    # factual partition: matched -> strong-coupled (1), mismatched -> partial-coupled (2)
    assert np.array_equal(f_only, np.where(f_matched, 1, 2))
    assert np.array_equal(e_only, np.where(e_matched, 1, 3))
    assert np.array_equal(both, partition_codes(f_matched, e_matched))
    # the factual partition is the full partition with every pair emotional-matched
    assert np.array_equal(f_only, partition_codes(f_matched, np.ones(200, bool)))


def test_a_zero_threshold_is_not_a_one_score_partition():
    # on the clipscore scale a non-positive cosine stays unmatched at sigma = 0 (0 > 0 is false),
    # which is why Table 4's factual-only partition is use_scores=factual, not sigma_emotional=0
    codes = assign_partitions([0.5, 0.5], [0.3, -0.1], 0.7, 0.0)
    assert codes.tolist() == [1, 3]
    assert assign_partitions([0.5, 0.5], [0.3, -0.1], 0.7, 0.0, use_scores="factual").tolist() == [1, 1]


def test_unknown_use_scores_and_bad_unused_scores_are_refused():
    with pytest.raises(ValueError, match="use_scores must be one of both, factual, emotional, got 'text'"):
        assign_partitions([0.5], [0.5], 0.7, 0.7, use_scores="text")
    with pytest.raises(ValueError, match="finite"):
        assign_partitions([0.5], [float("nan")], 0.7, 0.7, use_scores="factual")
