"""One way to run batch-inference UDFs: in this process for small inputs, else on Ray Data.

A stage describes its work as a list of :class:`Udf` steps -- plain functions (CPU tasks: decode,
resize) and callable classes (model actors that load their weights once in ``__init__``, the Ray
Data idiom) -- each mapping a numpy batch ``{column: array [B, ...]}`` to a batch or an Arrow
table. :func:`run_udfs` then either

* loops over the input table in this process, each class built once (:func:`apply_in_process`),
  when the input has at most ``ray.in_process_max_rows`` rows (:func:`runs_in_process`): a pool's
  process starts and model loads would take longer than the work; or
* chains ``map_batches`` over a Ray Data dataset (:func:`apply_ray_data`), callable classes in
  autoscaling actor pools (``min_actors`` .. ``max_actors`` actors per model, Ray Data's
  ``ActorPoolStrategy(min_size, max_size)``) resourced by :func:`actor_pool_args`.

Both paths run the same UDFs on the same batches, so they give the same rows (tests compare them).

Adopting it (e.g. evaluation's feature extraction)::

    udfs = [Udf(decode, {"transform": transform}),                         # CPU task: {row, path} -> {row, pixels}
            Udf(FeatureExtractor, kwargs=extractor_kwargs, actor=True)]    # model actor: -> {row, feature}
    table = run_udfs_on_table(pa.Table.from_pylist(items), udfs,
                              pool=actor_pool(cfg.evaluate),
                              batch_size=cfg.evaluate.batch_size, ray_cfg=cfg.ray)
    # -> pa.Table (row, feature: fixed-size list [D]) on either path; sort by row.
    run_udfs(source_files, columns, udfs, out_uri, pool=..., batch_size=..., ray_cfg=...)  # -> Parquet
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa

from pacl_ray.config import RayConfig
from pacl_ray.formats import storage
from pacl_ray.formats.tables import ID

IN_PROCESS = "in_process"
RAY_DATA = "ray_data"


@dataclass(frozen=True)
class Udf:
    """One step: ``fn`` a function ``(batch, **kwargs)`` (a CPU task) or, with ``actor=True``, a
    callable class built as ``fn(**kwargs)`` once per actor (once in total in process).
    ``instance``: an already built object to use in process instead of building ``fn`` (a caller
    that needed the model on the driver anyway)."""

    fn: Callable
    kwargs: dict = field(default_factory=dict)
    actor: bool = False
    instance: Any = None


@dataclass(frozen=True)
class ActorPool:
    """Actor pools of one stage: each model step's pool autoscales between ``min_actors`` and
    ``max_actors`` actors (Ray Data adds actors while inputs queue, up to ``max_actors``, and
    removes idle ones down to ``min_actors``), ``num_gpus`` each when the cluster has GPUs, so a
    pool uses at most ``max_actors * num_gpus`` GPUs; ``pools``: how many model pools run at once
    (CPU sharing). Raises ValueError unless ``1 <= min_actors <= max_actors``."""

    min_actors: int = 1
    max_actors: int = 1
    num_gpus: float = 1.0
    pools: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_actors <= self.max_actors:
            raise ValueError(f"ActorPool: need 1 <= min_actors <= max_actors, got min_actors={self.min_actors}, "
                             f"max_actors={self.max_actors}")


def actor_pool(section: Any, pools: int = 1) -> ActorPool:
    """The :class:`ActorPool` of an inference config section (``partition``, ``embed``,
    ``evaluate``: its ``min_actors``, ``max_actors`` and ``num_gpus``)."""
    return ActorPool(section.min_actors, section.max_actors, section.num_gpus, pools=pools)


def runs_in_process(rows: int, cfg: RayConfig) -> bool:
    """Whether ``rows`` inputs run in this process (``cfg.in_process_max_rows``) rather than in
    Ray Data actor pools. Never when the cluster has GPUs that this process cannot use: the models
    belong on them. Call after :func:`pacl_ray.stages.runtime.init_ray`."""
    import torch

    from pacl_ray.stages.runtime import cluster_gpus

    if cfg.in_process_max_rows <= 0 or rows > cfg.in_process_max_rows:
        return False
    return cluster_gpus() == 0 or torch.cuda.is_available()


def actor_pool_args(pool: ActorPool, batch_size: int) -> dict:
    """``map_batches`` arguments of one model step's actor pool.

    ``compute`` is ``ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors)``: an
    autoscaling pool. With GPUs each actor takes ``pool.num_gpus``. CPU-only, whole-CPU actors
    would take every CPU of a small machine and leave none for the read / decode / write tasks (a
    deadlock on 2 cores): the actors of all ``pool.pools`` pools, each at its largest, share at
    most half of the cluster's CPUs.
    """
    import ray

    from pacl_ray.stages.runtime import cluster_cpus, cluster_gpus

    strategy = ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors)
    args: dict = {"compute": strategy, "batch_size": batch_size, "batch_format": "numpy"}
    if cluster_gpus() > 0:
        args["num_gpus"] = pool.num_gpus
    else:
        actors = max(1, pool.pools * pool.max_actors)
        args["num_cpus"] = min(1.0, max(cluster_cpus(), 1.0) / (2 * actors))
    return args


def numpy_batches(table: pa.Table, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """``table`` in batches of ``batch_size`` rows, each a dict column -> array [B], the form
    Ray Data's ``batch_format="numpy"`` hands a UDF (strings and bytes as object arrays)."""
    for start in range(0, table.num_rows, max(1, batch_size)):
        chunk = table.slice(start, batch_size)
        yield {name: chunk.column(name).to_numpy(zero_copy_only=False) for name in chunk.column_names}


def _column(values: Any) -> Any:
    array = np.asarray(values)
    if array.ndim == 2 and array.dtype.kind in "fiub":  # [B, D] -> fixed-size list (width kept)
        return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(array).reshape(-1)), array.shape[1])
    return list(values) if array.ndim > 1 else values


def _as_table(out: Any) -> pa.Table:
    """A UDF's output batch (Arrow table or dict of numpy columns) as an Arrow table; numeric
    [B, D] columns become fixed-size lists of width D."""
    if isinstance(out, pa.Table):
        return out
    return pa.table({k: _column(v) for k, v in out.items()})


def _callables(udfs: list[Udf]) -> list[Callable]:
    steps = []
    for udf in udfs:
        if udf.instance is not None:
            steps.append(udf.instance)
        elif udf.actor:
            steps.append(udf.fn(**udf.kwargs))
        else:
            steps.append(functools.partial(udf.fn, **udf.kwargs) if udf.kwargs else udf.fn)
    return steps


def progress(udfs: list[Udf], rows: int):
    """A progress line (counts, rate, ETA) at least every 10 s while the UDFs run over ``rows``
    inputs, none for a run shorter than that (:class:`pacl_ray.stages.runtime.Progress`)."""
    from pacl_ray.stages.runtime import Progress

    names = "+".join(getattr(u.fn, "__name__", "udf") for u in udfs if u.actor) or "udfs"
    return Progress(f"[inference] {names}", rows, "rows", final=False)


def apply_in_process(table: pa.Table, udfs: list[Udf], batch_size: int,
                     empty: Optional[pa.Schema] = None) -> pa.Table:
    """The UDFs in a plain loop in this process over ``table``'s rows -> the concatenated output
    (``empty``'s empty table when there are no rows)."""
    from pacl_ray.stages.runtime import Watch

    parts: list[pa.Table] = []
    done = [0]
    with Watch(progress(udfs, table.num_rows), lambda: done[0]) as watch:  # a line every 10 s, even mid-batch
        if any(u.actor and u.instance is None for u in udfs):
            watch.progress.phase = "loading the models"  # weights from disk: slow on a busy machine
        steps = _callables(udfs)
        watch.progress.phase = ""
        for batch in numpy_batches(table, batch_size):
            rows = len(next(iter(batch.values())))
            for step in steps:
                batch = step(batch)
            parts.append(_as_table(batch))
            done[0] += rows
    if not parts:
        if empty is None:
            raise ValueError("apply_in_process: no input rows and no output schema given")
        return empty.empty_table()
    return pa.concat_tables(parts)


def apply_ray_data(ds: Any, udfs: list[Udf], batch_size: int, pool: ActorPool) -> Any:
    """The lazy Ray Data pipeline: ``map_batches`` per UDF, callable classes in actor pools."""
    for udf in udfs:
        if udf.actor:
            ds = ds.map_batches(udf.fn, fn_constructor_kwargs=udf.kwargs, **actor_pool_args(pool, batch_size))
        else:
            ds = ds.map_batches(udf.fn, fn_kwargs=udf.kwargs, batch_size=batch_size, batch_format="numpy")
    return ds


def in_id_order(table: pa.Table) -> pa.Table:
    """``table`` sorted by its ``id`` column (unchanged without one).

    Why: a Ray Data write leaves its Parquet files in no fixed order (which file holds which
    rows changes from run to run), and a model's float output for a row depends at the last bit
    on the other rows of its batch (BLAS blocking by batch size and content). Reading in id
    order makes every batch, and so every score and feature, the same run after run; without
    it those last-bit differences reach training, where a few steps of Adam turn them into
    results that differ by points (measured on the default world: emotion accuracy 52.0 or
    56.3 from the same inputs)."""
    return table.sort_by(ID) if ID in table.column_names else table


def run_udfs(
    source: str | list[str], columns: list[str], udfs: list[Udf], out_uri: str, *, pool: ActorPool,
    batch_size: int, ray_cfg: RayConfig, empty: Optional[pa.Schema] = None,
    in_process_udfs: Optional[list[Udf]] = None,
) -> str:
    """Read ``columns`` of the Parquet directory (or files) ``source``, apply the UDFs, write
    Parquet under ``out_uri``. Returns the executor used, ``"in_process"`` or ``"ray_data"``.

    ``in_process_udfs`` replace ``udfs`` on the in-process path (e.g. with prebuilt instances)."""
    from pacl_ray.stages.runtime import init_ray

    init_ray(ray_cfg)
    rows = storage.parquet_rows(source)
    if runs_in_process(rows, ray_cfg):
        table = in_id_order(storage.read_parquet_dir(source, columns=columns))
        storage.write_parquet(apply_in_process(table, in_process_udfs or udfs, batch_size, empty), out_uri)
        return IN_PROCESS
    import ray

    if isinstance(source, str):
        fs, paths = storage.resolve(source)
    else:
        fs, _ = storage.resolve(source[0]) if source else storage.resolve(out_uri)
        paths = [storage.resolve(uri)[1] for uri in source]
    read = ray.data.read_parquet(paths, filesystem=fs, columns=columns, file_extensions=["parquet"])
    ds = apply_ray_data(read, udfs, batch_size, pool)
    out_fs, out_path = storage.resolve(out_uri)
    from pacl_ray.stages.runtime import Watch

    # Progress from the rows of the Parquet files the write has finished so far.
    with Watch(progress(udfs, rows), functools.partial(_written_rows, out_uri, {})):
        ds.write_parquet(out_path, filesystem=out_fs)
    return RAY_DATA


def _written_rows(uri: str, seen: dict[str, int]) -> int:
    """Rows in the finished Parquet files under ``uri`` (``seen`` caches each file's count; a
    file still being written is not readable yet and is counted at a later call)."""
    for file in storage.list_files(uri, ".parquet"):
        if file not in seen:
            try:
                seen[file] = storage.parquet_file_rows(file)
            except storage.FileCheckError:
                continue
    return sum(seen.values())


def run_udfs_on_table(table: pa.Table, udfs: list[Udf], *, pool: ActorPool, batch_size: int,
                      ray_cfg: RayConfig, empty: Optional[pa.Schema] = None) -> pa.Table:
    """:func:`run_udfs` on an in-memory table, returning the output table (either path; rows in
    no particular order on Ray Data, so carry an id or row column). Numeric [B, D] output columns
    become fixed-size lists of width D on both paths."""
    import math

    from pacl_ray.stages.runtime import init_ray

    init_ray(ray_cfg)
    if runs_in_process(table.num_rows, ray_cfg):
        return apply_in_process(table, udfs, batch_size, empty)
    import ray

    # Blocks of a few batches each, so the actors of a pool share the work (one block per input
    # table would go to one actor).
    blocks = max(1, math.ceil(table.num_rows / (4 * max(1, batch_size))))
    ds = apply_ray_data(ray.data.from_arrow(table).repartition(blocks), udfs, batch_size, pool)
    from pacl_ray.stages.runtime import Watch

    parts: list[pa.Table] = []
    with Watch(progress(udfs, table.num_rows), lambda: sum(part.num_rows for part in parts)):
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            parts.append(_as_table(batch))
    return pa.concat_tables(parts) if parts else (empty.empty_table() if empty is not None else pa.table({}))
