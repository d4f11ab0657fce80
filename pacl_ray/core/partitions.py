"""Partition math (SPEC "Partitions"): calibrations, thresholds and partition codes. Pure numpy.

A pair is *matched* on a score when its calibrated score is strictly greater than the threshold:

    code 1  strong-coupled           factual matched     emotional matched
    code 2  partial, emotional-only  factual mismatched  emotional matched
    code 3  partial, factual-only    factual matched     emotional mismatched
    code 4  weak-coupled             factual mismatched  emotional mismatched

Calibrations map a raw cosine to the scale the threshold sigma is read on:

* ``raw``: the cosine itself.
* ``clipscore``: ``2.5 * max(cos, 0)`` (Hessel et al.'s CLIPScore), which puts true CLIP pairs
  (cos 0.2-0.35) around 0.5-0.9 so a paper-like sigma of 0.7 is meaningful.
* ``rank``: the dataset percentile ``#{j : x_j <= x_i} / N`` in (0, 1]; sigma = 0.7 then marks
  the top 30% (fewer with ties) as matched, sigma = 0 matches everything and sigma = 1 nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CALIBRATIONS = ("raw", "clipscore", "rank")
USE_SCORES = ("both", "factual", "emotional")  # which scores a partition thresholds (paper Table 4)
PARTITION_CODES = (1, 2, 3, 4)  # strong, partial (emotional-only), partial (factual-only), weak
PARTITION_NAMES = {
    1: "strong-coupled",
    2: "partial (emotional-only)",
    3: "partial (factual-only)",
    4: "weak-coupled",
}
CLIPSCORE_WEIGHT = 2.5


def _as_scores(scores: Any) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"scores must be finite; index {int(bad[0])} is {arr[bad[0]]}")
    return arr


def percentile_rank(scores: Any) -> np.ndarray:
    """``#{j : x_j <= x_i} / N`` for each i: [N] -> [N] in (0, 1]; ties share the larger rank."""
    arr = _as_scores(scores)
    if arr.size == 0:
        return arr.copy()
    ordered = np.sort(arr)
    return np.searchsorted(ordered, arr, side="right") / arr.size


def calibrate(scores: Any, method: str) -> np.ndarray:
    """Calibrated scores [N] (float64) of raw cosines [N] by a method from :data:`CALIBRATIONS`."""
    arr = _as_scores(scores)
    if method == "raw":
        return arr.copy()
    if method == "clipscore":
        return CLIPSCORE_WEIGHT * np.maximum(arr, 0.0)
    if method == "rank":
        return percentile_rank(arr)
    raise ValueError(f"unknown calibration {method!r}; expected one of {', '.join(CALIBRATIONS)}")


def partition_codes(factual_matched: Any, emotional_matched: Any) -> np.ndarray:
    """Partition codes int8 [N] from boolean match flags [N] (table in the module docstring)."""
    f = np.asarray(factual_matched, dtype=bool).reshape(-1)
    e = np.asarray(emotional_matched, dtype=bool).reshape(-1)
    if f.shape != e.shape:
        raise ValueError(f"factual and emotional flags differ in length: {f.size} vs {e.size}")
    # 1 + (factual mismatched) + 2 * (emotional mismatched) reproduces the table exactly.
    return (1 + (~f).astype(np.int8) + 2 * (~e).astype(np.int8)).astype(np.int8)


def calibrated_scores(
    factual: Any, emotional: Any, factual_calibration: str, emotional_calibration: str
) -> tuple[np.ndarray, np.ndarray]:
    """Both raw scores [N] on their calibrated scales (methods from :data:`CALIBRATIONS`)."""
    return calibrate(factual, factual_calibration), calibrate(emotional, emotional_calibration)


def assign_partitions(
    factual: Any,
    emotional: Any,
    sigma_factual: float,
    sigma_emotional: float,
    factual_calibration: str = "clipscore",
    emotional_calibration: str = "clipscore",
    use_scores: str = "both",
) -> np.ndarray:
    """Partition codes int8 [N] of raw factual and emotional cosines [N] (paper 3.1, SPEC Partitions).

    A score is matched when its calibrated value is strictly above its threshold. Cheap and
    model-free, so a sigma sweep calls this on stored scores.

    ``use_scores`` (:data:`USE_SCORES`) selects paper Table 4's partitions: ``both`` thresholds
    both scores (PACL); ``factual`` thresholds only the factual score and marks every pair
    emotional-matched, so the codes are 1 (factual-matched, "strong") and 2 (factual-mismatched,
    "partial"); ``emotional`` likewise gives codes 1 and 3 (SPEC "Choice (sample usage, Table 4)").
    The unused score is still validated. A threshold of 0 is not the same thing: on the
    ``clipscore`` scale a non-positive cosine stays unmatched at sigma = 0.

    Raises ValueError for non-finite scores, an unknown calibration or an unknown ``use_scores``.
    """
    if use_scores not in USE_SCORES:
        raise ValueError(f"use_scores must be one of {', '.join(USE_SCORES)}, got {use_scores!r}")
    factual_cal, emotional_cal = calibrated_scores(factual, emotional, factual_calibration, emotional_calibration)
    every_pair = np.ones(factual_cal.shape, dtype=bool)
    factual_matched = every_pair if use_scores == "emotional" else factual_cal > float(sigma_factual)
    emotional_matched = every_pair if use_scores == "factual" else emotional_cal > float(sigma_emotional)
    return partition_codes(factual_matched, emotional_matched)


def partition_counts(codes: Any) -> dict[int, int]:
    """{code: count} for codes 1-4 (zeros included)."""
    arr = np.asarray(codes).reshape(-1)
    return {code: int(np.sum(arr == code)) for code in PARTITION_NAMES}


def confusion_matrix(planted: Any, assigned: Any) -> np.ndarray:
    """4x4 counts [planted - 1, assigned - 1] over rows whose planted code is 1-4."""
    planted = np.asarray(planted).reshape(-1)
    assigned = np.asarray(assigned).reshape(-1)
    matrix = np.zeros((4, 4), dtype=np.int64)
    valid = np.isin(planted, (1, 2, 3, 4)) & np.isin(assigned, (1, 2, 3, 4))
    np.add.at(matrix, (planted[valid].astype(int) - 1, assigned[valid].astype(int) - 1), 1)
    return matrix
