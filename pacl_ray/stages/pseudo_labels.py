"""Stage 2b (paper 3.2): k-means pseudo-labels for every K of a sweep, sharded over Ray actors.

    factual_label_<K>   = k-means(K) over the L2-normalised initial-backbone image features
    emotional_label_<K> = k-means(K) over the L2-normalised frozen text-encoder features

Each :class:`ShardWorker` (a Ray actor, or a plain object on the single-process path) loads a
contiguous row range of the embed stage's ``features/`` Parquet *once* and keeps both modalities
resident; FAISS assigns its rows on the actor's GPU when it has one (``cluster.use_gpu``), else on
CPU. The driver (:func:`fit_distributed`) merges the per-centroid partial sums, updates centroids,
re-seeds empty clusters and iterates; all K of the sweep advance in lockstep, one actor call per
iteration, from the same resident shards. The math is :mod:`pacl_ray.core.kmeans`, shared with the
single-process :func:`pacl_ray.core.kmeans.kmeans_fit`, so sharding does not change the result.

Rows are ordered by feature file (sorted path) then row (the global row index that shards
split); the seeded init sample is drawn in id order, so results depend on the seed and neither on
the shard count nor on the order in which the embed stage happened to write its rows.

Outputs under the stage directory::

    labels/part-00000.parquet   tables.labels_schema(ks): id, factual_label_<K>, emotional_label_<K>
    centroids/k<K>.safetensors  "factual" float32 [K, D_image], "emotional" float32 [K, D_text]
    report.json                 inertia, iterations and cluster sizes per K and modality
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pacl_ray.stages import cache
from pacl_ray.core import kmeans
from pacl_ray.formats import tables
from pacl_ray.formats import storage
from pacl_ray.stages.cache import StageOutput
from pacl_ray.config import RunConfig

STAGE = "cluster"
ROWS_PER_SHARD = 50_000  # cluster.num_shards=0 picks one shard per this many rows
MODALITY_COLUMNS = {"factual": "image_feature", "emotional": "text_feature"}


# --------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class ParquetSlice:
    """Rows [start, stop) of the concatenation of ``files`` (each given with its row count)."""

    files: tuple[tuple[str, int], ...]
    start: int
    stop: int
    expected: tuple[tuple[str, int, str], ...] = ()  # (uri, size, sha256) from the stage's record


def fixed_size_list_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size list column -> float32 [n, width]."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = array.type.list_size
    flat = array.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, width).astype(np.float32, copy=False)


def read_parquet_slice(part: ParquetSlice, columns: Sequence[str]) -> pa.Table:
    """The rows of ``part`` (only the files overlapping it are read, each checked against
    ``part.expected`` when given)."""
    expected = {uri: (size, sha) for uri, size, sha in part.expected}
    pieces, first = [], 0
    for uri, rows in part.files:
        lo, hi = max(part.start, first), min(part.stop, first + rows)
        if lo < hi:
            table = storage.read_parquet_dir([uri], columns=list(columns), expected=expected)
            if table.num_rows != rows:
                raise ValueError(f"{uri}: expected {rows} rows (from its metadata), read {table.num_rows}")
            pieces.append(table.slice(lo - first, hi - lo))
        first += rows
    if not pieces:
        raise ValueError(f"no rows in [{part.start}, {part.stop}) of {[u for u, _ in part.files]}")
    return pa.concat_tables(pieces)


class NonFiniteFeaturesError(ValueError):
    """Feature rows hold NaN or inf; the message names the ids and the modality."""


def check_finite(points: dict[str, np.ndarray], ids: Sequence[str], where: str) -> None:
    """Raise :class:`NonFiniteFeaturesError` naming the ids and the modality of any NaN/inf feature row.

    ``points``: {modality: float [n, D]}; k-means would otherwise fail far from the cause."""
    for modality, x in points.items():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if len(bad):
            named = [ids[i] for i in bad[:10]]
            raise NonFiniteFeaturesError(
                f"cluster: features {where}: {len(bad)} row(s) of {MODALITY_COLUMNS[modality]} ({modality}) hold "
                f"NaN or inf, ids {named} (the embed stage's output for these pairs)"
            )


class ShardWorker:
    """One shard of the points, resident for a whole sweep: {modality: float32 [n, D]}.

    ``source`` is either a mapping of in-memory arrays (used as given) or a :class:`ParquetSlice`
    of feature files (read once, L2-normalised). ``offset`` is the shard's first global row.
    """

    def __init__(self, source: dict[str, np.ndarray] | ParquetSlice, offset: int = 0, use_gpu: bool = False):
        if isinstance(source, ParquetSlice):
            table = read_parquet_slice(source, [tables.ID, *MODALITY_COLUMNS.values()])
            raw = {m: fixed_size_list_to_numpy(table[c]) for m, c in MODALITY_COLUMNS.items()}
            check_finite(raw, table[tables.ID].to_pylist(), source.files[0][0].rsplit("/", 1)[0] if source.files else "")
            self.points = {m: kmeans.l2_normalize(x) for m, x in raw.items()}
            offset = source.start
        else:
            self.points = {m: np.ascontiguousarray(x, dtype=np.float32) for m, x in source.items()}
        sizes = {len(x) for x in self.points.values()}
        if len(sizes) != 1:
            raise ValueError(f"shard modalities have different row counts: {sizes}")
        self.offset = int(offset)
        self.assigner = kmeans.Assigner(use_gpu)

    def num_rows(self) -> int:
        return len(next(iter(self.points.values())))

    def rows(self, modality: str, global_indices: np.ndarray) -> np.ndarray:
        """The shard's rows among sorted ``global_indices`` -> float32 [m, D]."""
        local = global_indices[(global_indices >= self.offset) & (global_indices < self.offset + self.num_rows())]
        return self.points[modality][local - self.offset]

    def _stats(self, modality: str, centroids: np.ndarray) -> tuple[np.ndarray, kmeans.PartialStats]:
        x = self.points[modality]
        labels, dist2 = self.assigner(x, centroids)
        return labels, kmeans.partial_stats(x, labels, dist2, len(centroids), offset=self.offset)

    def step(self, modality: str, centroids_by_k: dict[int, np.ndarray]) -> dict[int, kmeans.PartialStats]:
        """One Lloyd map step for every K at once."""
        return {k: self._stats(modality, c)[1] for k, c in centroids_by_k.items()}

    def final(self, modality: str, centroids_by_k: dict[int, np.ndarray]) -> dict[int, tuple[np.ndarray, kmeans.PartialStats]]:
        """Labels int32 [n] and statistics of the final assignment for every K."""
        out = {}
        for k, c in centroids_by_k.items():
            labels, stats = self._stats(modality, c)
            out[k] = (labels.astype(np.int32), stats)
        return out


def _call_all(shards: Sequence[Any], method: str, *args: Any) -> list[Any]:
    """Call ``method`` on every shard (Ray actor handles in parallel, plain objects in turn)."""
    import ray

    if shards and isinstance(shards[0], ray.actor.ActorHandle):
        return ray.get([getattr(s, method).remote(*args) for s in shards])
    return [getattr(s, method)(*args) for s in shards]


def split_offsets(n: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges of near-equal size."""
    bounds = np.linspace(0, n, num_shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def shard_actors(
    arrays: dict[str, np.ndarray] | ParquetSlice, num_shards: int, use_gpu: bool = False
) -> list[Any]:
    """Start ``num_shards`` Ray actors over contiguous row ranges of in-memory ``arrays``
    (Ray ships large arguments through the object store) or of a :class:`ParquetSlice`."""
    import ray

    actor_cls = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(ShardWorker)
    if isinstance(arrays, ParquetSlice):
        ranges = split_offsets(arrays.stop - arrays.start, num_shards)
        return [
            actor_cls.remote(ParquetSlice(arrays.files, arrays.start + a, arrays.start + b, arrays.expected),
                             use_gpu=use_gpu)
            for a, b in ranges
        ]
    n = len(next(iter(arrays.values())))
    return [
        actor_cls.remote({m: np.ascontiguousarray(x[a:b]) for m, x in arrays.items()}, offset=a, use_gpu=use_gpu)
        for a, b in split_offsets(n, num_shards)
    ]


# --------------------------------------------------------------------------- driver


def fit_distributed(
    shards: Sequence[Any],
    ks: Sequence[int],
    modality: str,
    seed: int = 0,
    max_iter: int = 50,
    tol: float = 1e-6,
    init_centroids: dict[int, np.ndarray] | None = None,
    what: str = "k-means input",
    init_order: np.ndarray | None = None,
    progress: Any = None,
) -> dict[int, kmeans.KMeansResult]:
    """Fit k-means for every K in ``ks`` over the rows held by ``shards`` (in global row order).

    ``init_order`` [n] (a permutation of the global rows, e.g. their order by id) makes the seeded
    init sample and its k-means++ order follow it instead of the storage order, so rows written
    in another order (Ray Data does not keep order across runs) give the same init.

    ``shards`` are :class:`ShardWorker` Ray actor handles or plain instances. Every iteration is
    one call per shard covering all K still running. Returns {K: KMeansResult} with labels for all
    rows in global order; for the same init it matches :func:`pacl_ray.core.kmeans.kmeans_fit`.

    ``progress`` (a :class:`pacl_ray.stages.runtime.Progress` counting iterations, or None): each
    Lloyd iteration adds one, and its total (the caller counts ``max_iter`` for this call) drops
    by the iterations that convergence leaves out; its phase names the uncounted steps (init,
    final assignment).
    """
    def phase(text: str) -> None:
        if progress is not None:
            progress.phase = text

    n = int(sum(_call_all(shards, "num_rows")))  # waits for shard actors still loading their rows
    phase(f"{modality} k-means++ init")
    ks = sorted({int(k) for k in ks})
    for k in ks:
        kmeans.check_enough_points(n, k, what)
    centroids: dict[int, np.ndarray] = {}
    for k in ks:
        if init_centroids is not None and k in init_centroids:
            centroids[k] = np.asarray(init_centroids[k], dtype=np.float32)
        else:
            centroids[k] = kmeans.kmeans_plusplus(_init_sample(shards, modality, n, k, seed, init_order), k, seed)
    n_iter = {k: 0 for k in ks}
    active = list(ks)
    phase("")
    for it in range(1, max_iter + 1):
        if not active:
            if progress is not None:  # converged: the iterations left are not coming
                progress.total -= max_iter - (it - 1)
            break
        parts = _call_all(shards, "step", modality, {k: centroids[k] for k in active})
        still = []
        for k in active:
            merged = kmeans.merge_partials([p[k] for p in parts])
            new, _ = kmeans.update_centroids(merged, centroids[k])
            shift = kmeans.max_shift(centroids[k], new)
            centroids[k], n_iter[k] = new, it
            if shift > tol:
                still.append(k)
        active = still
        if progress is not None:
            progress.update(1)
    phase(f"{modality} final assignment")
    finals = _call_all(shards, "final", modality, centroids)
    results = {}
    for k in ks:
        labels = np.concatenate([f[k][0] for f in finals])
        inertia = kmeans.merge_partials([f[k][1] for f in finals]).inertia
        results[k] = kmeans.KMeansResult(centroids=centroids[k], labels=labels, inertia=inertia, n_iter=n_iter[k])
    return results


def _init_sample(shards: Sequence[Any], modality: str, n: int, k: int, seed: int,
                 init_order: np.ndarray | None) -> np.ndarray:
    """The seeded init sample [m, D], in ``init_order`` (global row order when None)."""
    idx = kmeans.init_sample_indices(n, k, seed)
    if init_order is None:
        return np.concatenate(_call_all(shards, "rows", modality, idx))
    wanted = np.asarray(init_order, dtype=np.int64)[idx]  # global rows, in init order
    fetched = np.sort(wanted)
    rows = np.concatenate(_call_all(shards, "rows", modality, fetched))
    return rows[np.searchsorted(fetched, wanted)]


# --------------------------------------------------------------------------- stage


def cluster_key(cfg: RunConfig, embed: StageOutput) -> str:
    c = cfg.cluster
    return cache.content_key(STAGE, embed, sorted(set(c.ks)), c.max_iter, c.tol, cfg.seed)


def feature_files(embed: StageOutput) -> tuple[tuple[str, int], ...]:
    """The embed stage's feature files in global row order, with their row counts."""
    files = cache.table_files(embed, "features")
    if not files:
        raise FileNotFoundError(f"{embed.path('features')}: no Parquet feature files")
    return tuple((uri, storage.parquet_file_rows(uri)) for uri in files)


def _expected(embed: StageOutput) -> tuple[tuple[str, int, str], ...]:
    return tuple((embed.path(rel), size, sha) for rel, (size, sha) in sorted((embed.files or {}).items()))


def choose_num_shards(cfg: RunConfig, n: int) -> tuple[int, bool]:
    """(shards, actors on GPU): cluster.num_shards, or one per 50k rows, capped by what the Ray
    cluster can host (one GPU per actor when it has GPUs and cluster.use_gpu, else one CPU)."""
    from pacl_ray.stages import runtime

    wanted = cfg.cluster.num_shards or max(1, math.ceil(n / ROWS_PER_SHARD))
    if wanted <= 1:
        return 1, False
    runtime.init_ray(cfg.ray)
    use_gpu = cfg.cluster.use_gpu and runtime.cluster_gpus() > 0
    capacity = runtime.cluster_gpus() if use_gpu else runtime.cluster_cpus()
    return max(1, min(wanted, int(capacity) or 1, n)), use_gpu


def _write_outputs(
    uri: str, ids: pa.Array, ks: list[int], results: dict[str, dict[int, kmeans.KMeansResult]], num_shards: int
) -> dict:
    from safetensors.numpy import save as save_safetensors

    columns = {tables.ID: ids}
    for k in ks:
        columns[tables.factual_label_column(k)] = pa.array(results["factual"][k].labels, pa.int32())
        columns[tables.emotional_label_column(k)] = pa.array(results["emotional"][k].labels, pa.int32())
    table = pa.Table.from_pydict(columns, schema=tables.labels_schema(ks))
    storage.write_parquet(table, storage.join(uri, "labels"))
    for k in ks:
        blob = save_safetensors({m: results[m][k].centroids for m in MODALITY_COLUMNS})
        storage.write_bytes(storage.join(uri, "centroids", f"k{k}.safetensors"), blob)
    report = {"num_points": len(ids), "num_shards": num_shards, "ks": ks, "per_k": {}}
    for k in ks:
        report["per_k"][str(k)] = {
            m: {
                "inertia": results[m][k].inertia,
                "n_iter": results[m][k].n_iter,
                "sizes": results[m][k].sizes.tolist(),
            }
            for m in MODALITY_COLUMNS
        }
    storage.write_text(storage.join(uri, "report.json"), json.dumps(report, indent=2))
    return report


def format_report(report: dict) -> str:
    lines = [f"cluster: {report['num_points']} points, K = {report['ks']}"]
    for k, per in report["per_k"].items():
        for m in MODALITY_COLUMNS:
            r = per[m]
            lines.append(f"  K={k:>3} {m:<9} inertia {r['inertia']:.4g}  iters {r['n_iter']:>3}  sizes {r['sizes']}")
    return "\n".join(lines)


def run_cluster(cfg: RunConfig, embed: StageOutput) -> StageOutput:
    """Pseudo-labels for every K in ``cfg.cluster.ks`` (cached by content key)."""
    ks = sorted(set(cfg.cluster.ks))
    if not ks:
        raise ValueError("cluster.ks is empty: give at least one K, e.g. --k 2,3,6,10,15,25")

    def build(uri: str) -> dict:
        from pacl_ray.stages.runtime import watched

        # A line at least every runtime.PROGRESS_INTERVAL_S seconds: iterations of both
        # modalities (at most max_iter each), or the step that runs when they cannot be counted.
        with watched("[cluster] k-means", len(MODALITY_COLUMNS) * cfg.cluster.max_iter, "iterations",
                     phase="reading the features") as watch:
            return _build_cluster(cfg, embed, ks, uri, watch.progress)

    return cache.run_cached(cfg.output_dir, STAGE, cluster_key(cfg, embed), build, config=cfg,
                            describe=format_report)


def _build_cluster(cfg: RunConfig, embed: StageOutput, ks: list[int], uri: str, progress: Any) -> dict:
    """:func:`run_cluster`'s work into the staging directory ``uri``; ``progress`` as in
    :func:`fit_distributed`."""
    files = feature_files(embed)
    n = sum(rows for _, rows in files)
    what = f"cluster: features {embed.path('features')}"
    for k in ks:
        kmeans.check_enough_points(n, k, what)
    num_shards, use_gpu = choose_num_shards(cfg, n)
    everything = ParquetSlice(files, 0, n, _expected(embed))
    progress.phase = f"loading {n} rows into {num_shards} shard(s)"
    if num_shards == 1:
        shards: list[Any] = [ShardWorker(everything, use_gpu=cfg.cluster.use_gpu)]
    else:
        shards = shard_actors(everything, num_shards, use_gpu=use_gpu)
    ids = read_parquet_slice(everything, [tables.ID])[tables.ID].combine_chunks()
    # The embed stage's row order varies between runs; initialise in id order so it does not matter.
    by_id = np.argsort(ids.to_numpy(zero_copy_only=False).astype(str), kind="stable")
    try:
        results = {
            m: fit_distributed(shards, ks, m, cfg.seed, cfg.cluster.max_iter, cfg.cluster.tol,
                               what=f"{what} ({m})", init_order=by_id, progress=progress)
            for m in MODALITY_COLUMNS
        }
    finally:
        if num_shards > 1:
            import ray

            for actor in shards:
                ray.kill(actor)
    progress.phase = "writing the pseudo-labels"
    return _write_outputs(uri, ids, ks, results, num_shards)


def load_labels(cluster: StageOutput, k: int) -> pa.Table:
    """The pseudo-labels of one K -> table (id, factual_label, emotional_label) [N rows, int32
    labels], checked against the stage's completion record.

    Raises:
        KeyError: the cluster run has no labels for ``k`` (the message lists the Ks it has).
        pacl_ray.stages.cache.StageDataError: a labels file is missing or damaged (named).
    """
    files = cache.table_files(cluster, "labels")
    factual, emotional = tables.factual_label_column(k), tables.emotional_label_column(k)
    columns = [tables.ID, factual, emotional]
    try:
        available = pq.read_schema(storage.resolve(files[0])[1], filesystem=storage.resolve(files[0])[0]).names
    except (IndexError, pa.ArrowException, OSError):
        available = columns  # no or unreadable file: read_table says which
    if factual not in available:
        ks = sorted(int(c.rsplit("_", 1)[1]) for c in available if c.startswith("factual_label_"))
        raise KeyError(f"{cluster.path('labels')}: no pseudo-labels for K={k}; this cluster run has K={ks}")
    table = cache.read_table(cluster, "labels", columns=columns)
    return table.rename_columns([tables.ID, "factual_label", "emotional_label"])
