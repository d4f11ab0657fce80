"""K-means for the pseudo-labels (paper 3.2): pure math on numpy arrays, FAISS for assignment.

The algorithm is written as *map* and *reduce* steps so the same code runs on one process
(:func:`kmeans_fit`) and on Ray actors holding shards (:mod:`pacl_ray.stages.pseudo_labels`):

    map     shard x [n, D], centroids [K, D]  -> assign()        -> labels [n], dist2 [n]
            labels, dist2                      -> partial_stats() -> PartialStats (sums, counts, ...)
    reduce  [PartialStats per shard]           -> merge_partials() -> PartialStats
            PartialStats, centroids            -> update_centroids() -> new centroids [K, D]

Choices (documented in SPEC.md "Pseudo-labels"):

* Features are L2-normalised first (:func:`l2_normalize`); k-means itself is plain Euclidean
  (centroids are means and are *not* re-normalised).
* Seeded init: k-means++ (:func:`kmeans_plusplus`) over a seeded sample of at most
  ``256 * K`` rows (FAISS's own ``max_points_per_centroid``) drawn by *global row index*
  (:func:`init_sample_indices`), so the init does not depend on how the rows are sharded.
* Partial sums are float64, so merging shards in any grouping agrees to ~1e-12.
* Empty clusters are re-seeded deterministically, in increasing cluster index, with the points
  farthest from their centroid (ties broken by the lower global row index); the point is moved
  out of its donor cluster's sum, as scikit-learn does. A candidate is skipped when it sits on its
  centroid (distance 0: nothing left to split, e.g. fewer distinct points than K) or when moving
  it would empty its donor; if no candidate remains the cluster stays empty this iteration.
* Stopping: the largest Euclidean centroid shift is <= ``tol``, or ``max_iter`` updates. The
  returned labels and inertia come from a final assignment to the returned centroids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:
    import faiss
except ImportError as err:  # neither extra installed
    raise ImportError(
        "pacl_ray needs FAISS: install it with the project, pip install '.[cpu]' (or '.[gpu]' on CUDA machines)"
    ) from err

MAX_POINTS_PER_CENTROID = 256  # init sample size per centroid, as FAISS subsamples


class NotEnoughPointsError(ValueError):
    """K-means was asked for more clusters than there are points."""


def check_enough_points(n: int, k: int, what: str = "k-means input") -> None:
    if k < 1:
        raise ValueError(f"{what}: K must be >= 1, got {k}")
    if n < k:
        raise NotEnoughPointsError(f"{what}: K={k} clusters need at least {k} points, got {n}")


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm -> float32 [N, D] (all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, eps), dtype=np.float32)


# --------------------------------------------------------------------------- init


def init_sample_indices(n: int, k: int, seed: int) -> np.ndarray:
    """Sorted global row indices of the init sample -> int64 [min(n, 256 K)]."""
    size = min(n, MAX_POINTS_PER_CENTROID * k)
    if size == n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


def kmeans_plusplus(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Seeded k-means++ (Arthur & Vassilvitskii 2007) -> float32 centroids [k, D].

    When every remaining point coincides with a chosen centroid (fewer distinct points than k),
    the next centroid is a uniformly drawn unchosen point, so duplicates never raise.
    """
    points = np.asarray(points, dtype=np.float32)
    check_enough_points(len(points), k, "k-means++ init sample")
    rng = np.random.default_rng(seed)
    x64 = points.astype(np.float64)
    chosen = [int(rng.integers(len(points)))]
    d2 = ((x64 - x64[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        if total > 0:
            nxt = int(rng.choice(len(points), p=d2 / total))
        else:
            free = np.setdiff1d(np.arange(len(points)), chosen)
            nxt = int(rng.choice(free))
        chosen.append(nxt)
        d2 = np.minimum(d2, ((x64 - x64[nxt]) ** 2).sum(1))
    return points[chosen].copy()


# --------------------------------------------------------------------------- map


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class Assigner:
    """Nearest-centroid search with a FAISS flat L2 index (a GPU index when asked and present).

    The GPU resources object is created once and reused across iterations.
    """

    def __init__(self, use_gpu: bool = False):
        self.use_gpu = bool(use_gpu) and gpu_available()
        self._res = faiss.StandardGpuResources() if self.use_gpu else None

    def __call__(self, x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x float32 [n, D], centroids float32 [K, D] -> labels int64 [n], squared dist float32 [n]."""
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        d = centroids.shape[1]
        index = faiss.GpuIndexFlatL2(self._res, d) if self.use_gpu else faiss.IndexFlatL2(d)
        index.add(centroids)
        dist, labels = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
        # FAISS computes |x|^2 + |c|^2 - 2 x.c in float32, which can dip just below zero.
        return labels[:, 0].astype(np.int64), np.maximum(dist[:, 0], 0.0)


def assign(x: np.ndarray, centroids: np.ndarray, use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One-off :class:`Assigner` call -> labels int64 [n], squared distances float32 [n]."""
    return Assigner(use_gpu)(x, centroids)


@dataclass
class PartialStats:
    """What one shard contributes to a centroid update.

    sums float64 [K, D], counts int64 [K], inertia (sum of squared distances), and the shard's
    ``far_*`` candidates for re-seeding empty clusters: global row index int64 [m], squared
    distance float64 [m], current label int64 [m] and the point itself float32 [m, D].
    """

    sums: np.ndarray
    counts: np.ndarray
    inertia: float
    far_index: np.ndarray
    far_dist: np.ndarray
    far_label: np.ndarray
    far_points: np.ndarray


def partial_stats(
    x: np.ndarray, labels: np.ndarray, dist2: np.ndarray, k: int, offset: int = 0, n_far: int | None = None
) -> PartialStats:
    """Per-centroid float64 sums and counts of a shard, plus its ``n_far`` (default K) farthest
    points. ``offset`` is the shard's first global row index."""
    n, d = x.shape
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    sums = np.zeros((k, d), dtype=np.float64)
    for j in np.flatnonzero(counts):
        sums[j] = x[labels == j].sum(axis=0, dtype=np.float64)
    m = min(n, k if n_far is None else n_far)
    # Deterministic order: distance descending, then global index ascending.
    far = np.lexsort((np.arange(n), -dist2.astype(np.float64)))[:m]
    return PartialStats(
        sums=sums, counts=counts, inertia=float(dist2.sum(dtype=np.float64)),
        far_index=far.astype(np.int64) + offset, far_dist=dist2[far].astype(np.float64),
        far_label=labels[far].astype(np.int64), far_points=x[far].astype(np.float32),
    )


# --------------------------------------------------------------------------- reduce


def merge_partials(parts: list[PartialStats]) -> PartialStats:
    """Sum the shards' statistics and keep the globally farthest candidates (same order rule)."""
    if not parts:
        raise ValueError("merge_partials: no shard statistics to merge")
    far_index = np.concatenate([p.far_index for p in parts])
    far_dist = np.concatenate([p.far_dist for p in parts])
    order = np.lexsort((far_index, -far_dist))[: len(parts[0].counts)]
    return PartialStats(
        sums=np.sum([p.sums for p in parts], axis=0),
        counts=np.sum([p.counts for p in parts], axis=0),
        inertia=float(sum(p.inertia for p in parts)),
        far_index=far_index[order], far_dist=far_dist[order],
        far_label=np.concatenate([p.far_label for p in parts])[order],
        far_points=np.concatenate([p.far_points for p in parts])[order],
    )


def update_centroids(stats: PartialStats, centroids: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Means of the merged sums, re-seeding empty clusters -> (float32 [K, D], re-seeded ids)."""
    sums = stats.sums.copy()
    counts = stats.counts.copy()
    reseeded: list[int] = []
    candidates = iter(range(len(stats.far_index)))
    new = np.asarray(centroids, dtype=np.float64).copy()
    for j in np.flatnonzero(counts == 0):
        for c in candidates:
            donor = stats.far_label[c]
            if stats.far_dist[c] <= 0 or counts[donor] <= 1:
                continue
            point = stats.far_points[c].astype(np.float64)
            sums[donor] -= point
            counts[donor] -= 1
            sums[j], counts[j] = point, 1
            reseeded.append(int(j))
            break
    filled = counts > 0
    new[filled] = sums[filled] / counts[filled, None]
    return new.astype(np.float32), reseeded


def max_shift(old: np.ndarray, new: np.ndarray) -> float:
    """Largest Euclidean distance a centroid moved."""
    return float(np.sqrt(((np.asarray(new, np.float64) - np.asarray(old, np.float64)) ** 2).sum(1)).max())


# --------------------------------------------------------------------------- single process


@dataclass
class KMeansResult:
    centroids: np.ndarray  # float32 [K, D]
    labels: np.ndarray  # int64 [N]
    inertia: float  # sum of squared distances to the assigned centroid
    n_iter: int  # centroid updates performed

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.centroids))


def initial_centroids(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Seeded k-means++ over the global-index init sample of ``x`` -> float32 [k, D]."""
    check_enough_points(len(x), k)
    return kmeans_plusplus(x[init_sample_indices(len(x), k, seed)], k, seed)


def kmeans_fit(
    x: np.ndarray,
    k: int,
    seed: int = 0,
    max_iter: int = 50,
    tol: float = 1e-6,
    init_centroids: np.ndarray | None = None,
    use_gpu: bool = False,
) -> KMeansResult:
    """Lloyd's k-means on one process. ``x`` float32 [N, D] is used as given (normalise first
    with :func:`l2_normalize` for the pseudo-labels)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    check_enough_points(len(x), k)
    centroids = initial_centroids(x, k, seed) if init_centroids is None else np.asarray(init_centroids, np.float32)
    if centroids.shape != (k, x.shape[1]):
        raise ValueError(f"init_centroids has shape {centroids.shape}, expected {(k, x.shape[1])}")
    assigner = Assigner(use_gpu)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        labels, dist2 = assigner(x, centroids)
        new, _ = update_centroids(partial_stats(x, labels, dist2, k), centroids)
        shift = max_shift(centroids, new)
        centroids = new
        if shift <= tol:
            break
    labels, dist2 = assigner(x, centroids)
    return KMeansResult(centroids=centroids, labels=labels, inertia=float(dist2.sum(dtype=np.float64)), n_iter=n_iter)
