"""pacl_ray.core.kmeans against brute-force numpy references and planted configurations."""

from __future__ import annotations

import numpy as np
import pytest

from pacl_ray.core import kmeans


def blobs(n_per: int, centers: np.ndarray, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points around ``centers`` [C, D] -> (float32 [C * n_per, D], true labels [C * n_per])."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(centers)), n_per)
    x = centers[truth] + noise * rng.standard_normal((len(truth), centers.shape[1]))
    return x.astype(np.float32), truth


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Labels equal up to a permutation of cluster ids."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def lloyd_reference(x: np.ndarray, init: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray]:
    """Textbook Lloyd in float64 with brute-force distances (no empty clusters expected)."""
    x64, c = x.astype(np.float64), init.astype(np.float64)
    for _ in range(iters):
        labels = ((x64[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        c = np.stack([x64[labels == j].mean(0) for j in range(len(c))])
    labels = ((x64[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
    return c, labels


def test_l2_normalize_unit_rows_and_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])
    out = kmeans.l2_normalize(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]], atol=1e-7)


def test_assign_matches_brute_force():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 8)).astype(np.float32)
    c = rng.standard_normal((5, 8)).astype(np.float32)
    labels, dist2 = kmeans.assign(x, c)
    d = ((x[:, None].astype(np.float64) - c[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, d.argmin(1))
    np.testing.assert_allclose(dist2, d.min(1), rtol=1e-4, atol=1e-4)


def test_kmeans_fit_matches_textbook_lloyd_from_same_init():
    centers = np.eye(4, 6) * 4.0
    x, truth = blobs(30, centers, noise=0.5, seed=2)
    init = x[[0, 30, 60, 90]] + 0.3
    result = kmeans.kmeans_fit(x, 4, init_centroids=init, max_iter=20, tol=0.0)
    ref_c, ref_labels = lloyd_reference(x, init, result.n_iter)
    np.testing.assert_array_equal(result.labels, ref_labels)
    np.testing.assert_allclose(result.centroids, ref_c, atol=1e-5)
    assert same_partition(result.labels, truth)
    brute_inertia = ((x.astype(np.float64) - ref_c[ref_labels]) ** 2).sum()
    assert result.inertia == pytest.approx(brute_inertia, rel=1e-4)
    np.testing.assert_array_equal(result.sizes, [30, 30, 30, 30])


def test_kmeans_fit_is_seeded_and_recovers_blobs():
    centers = kmeans.l2_normalize(np.random.default_rng(3).standard_normal((3, 16)))
    x, truth = blobs(40, centers * 5, noise=0.2, seed=3)
    x = kmeans.l2_normalize(x)
    a = kmeans.kmeans_fit(x, 3, seed=7)
    b = kmeans.kmeans_fit(x, 3, seed=7)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert same_partition(a.labels, truth)
    assert 1 <= a.n_iter <= 50


def test_init_sample_is_global_and_bounded():
    idx = kmeans.init_sample_indices(10_000, 2, seed=0)
    assert len(idx) == 2 * kmeans.MAX_POINTS_PER_CENTROID
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(idx, kmeans.init_sample_indices(10_000, 2, seed=0))
    np.testing.assert_array_equal(kmeans.init_sample_indices(50, 2, seed=0), np.arange(50))


def test_fewer_points_than_k_is_a_clear_error():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(kmeans.NotEnoughPointsError, match="K=5 clusters need at least 5 points, got 3"):
        kmeans.kmeans_fit(x, 5)


def test_duplicate_points():
    base = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    x = np.repeat(base, 10, axis=0)
    result = kmeans.kmeans_fit(x, 3, seed=0)
    assert same_partition(result.labels, np.repeat(np.arange(3), 10))
    assert result.inertia == pytest.approx(0.0, abs=1e-6)
    # More clusters than distinct points: no error, the surplus cluster stays empty.
    result = kmeans.kmeans_fit(x, 4, seed=0)
    assert sorted(result.sizes.tolist()) == [0, 10, 10, 10]
    assert result.inertia == pytest.approx(0.0, abs=1e-6)


def test_kmeans_plusplus_spreads_over_distinct_points():
    base = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], np.float32)
    c = kmeans.kmeans_plusplus(np.repeat(base, 20, axis=0), 3, seed=1)
    assert {tuple(r) for r in c.tolist()} == {tuple(r) for r in base.tolist()}


def planted_empty_cluster():
    """Two blobs plus a far group; the third initial centroid attracts nothing at first."""
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [5.0, 6.0]])
    x, truth = blobs(20, centers, noise=0.1, seed=4)
    x = np.concatenate([x[:40], x[40:45]])  # 5 points in the far group
    truth = truth[:45]
    init = np.array([[0.0, 0.0], [10.0, 0.0], [100.0, 100.0]], np.float32)
    return x, truth, init


def test_empty_cluster_is_reseeded_from_the_farthest_point():
    x, truth, init = planted_empty_cluster()
    labels, dist2 = kmeans.assign(x, init)
    stats = kmeans.partial_stats(x, labels, dist2, 3)
    assert stats.counts[2] == 0
    new, reseeded = kmeans.update_centroids(stats, init)
    assert reseeded == [2]
    farthest = int(np.argmax(dist2))
    np.testing.assert_allclose(new[2], x[farthest])
    donor = labels[farthest]
    keep = (labels == donor) & (np.arange(len(x)) != farthest)
    np.testing.assert_allclose(new[donor], x[keep].mean(0), atol=1e-5)

    result = kmeans.kmeans_fit(x, 3, init_centroids=init)
    assert same_partition(result.labels, truth)
    assert result.sizes.min() > 0


def test_merging_shard_statistics_equals_whole():
    x, _, init = planted_empty_cluster()
    labels, dist2 = kmeans.assign(x, init)
    whole = kmeans.partial_stats(x, labels, dist2, 3)
    cuts = [0, 7, 30, len(x)]
    parts = [
        kmeans.partial_stats(x[a:b], labels[a:b], dist2[a:b], 3, offset=a) for a, b in zip(cuts[:-1], cuts[1:])
    ]
    merged = kmeans.merge_partials(parts)
    np.testing.assert_allclose(merged.sums, whole.sums, rtol=1e-12)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    np.testing.assert_array_equal(merged.far_index, whole.far_index)
    np.testing.assert_array_equal(merged.far_points, whole.far_points)
    assert merged.inertia == pytest.approx(whole.inertia, rel=1e-9)


def test_max_shift():
    a = np.zeros((2, 2), np.float32)
    b = np.array([[3.0, 4.0], [0.0, 1.0]], np.float32)
    assert kmeans.max_shift(a, b) == pytest.approx(5.0)
