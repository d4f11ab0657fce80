"""Stage 3's training feed: each epoch's global order, and each worker's share of it streamed
from storage (paper 3.3; SPEC "Training recipe": workers change speed, not the result).

Layout. The pairs are cut into *chunks* of ``train.feed_chunk_rows`` consecutive rows of a pairs
file, in storage order (:func:`chunk_layout`, from the id column only). For data streamed from
storage, :func:`write_feed` rewrites each pairs file once, joined with the pairs' text features and
pseudo-labels, as a Parquet file whose row groups are exactly these chunks (a chunk is then one
ranged read). The feed is cached by its inputs, so trials that differ only in sigma, objective or
optimiser share it; nothing in it passes through the object store.

Order (:func:`epoch_positions`). The global batch of B pairs is ``P = feed_shards(B,
train.feed_shards)`` canonical *shards* of B/P slots each. Every epoch, from the seed and the
epoch alone: the chunks holding pairs of the phase are permuted and dealt, in that order, to the
shard with the fewest phase pairs so far; each shard's stream is its chunks in that order, the
pairs inside a chunk in a seeded random order; global step s takes stream rows [s*B/P,
(s+1)*B/P) of every shard, shard after shard. None of this depends on the worker count W, so
1, 2 or 3 workers see the same global batches. Rank r trains on the slots [B*r//W, B*(r+1)//W)
of each global batch, i.e. on shards r*P/W..(r+1)*P/W-1 when W divides P, and reads exactly
their chunks: 1/W of the phase's image bytes per epoch. When W does not divide P a rank also
reads the chunks of the shards it shares with a neighbour (still the same batches). Steps per
epoch are the fewest full stream blocks over the shards; with one-row chunks this is exactly
``pairs // B``, with C-row chunks it can be lower by about C*P/B steps (the shards' loads differ
by at most one chunk).

Reading (:func:`stream_rank_batches`). A rank's chunks, ordered by the first step that needs
them, are a small Ray Dataset of chunk descriptors (ids and positions only); ``map_batches``
reads each chunk's row group from storage, keeps the rank's pairs and decodes them on CPU tasks,
and the rank merges the streamed rows into its per-step batches (at most about one chunk per shard
is buffered). No global sort, no shuffle, no materialised dataset. The pipeline's object-store use
is bounded by ``train.feed_object_store_mb`` per worker (Ray Data's resource limit on the
dataset's own context), not by the dataset size: Ray Data stops starting read and decode tasks
while the blocks in flight and prefetched fill the budget; the ids-level descriptors (rows,
positions, codes: about 24 bytes per pair of the rank) are the only part that grows with the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pacl_ray.formats import storage, tables
from pacl_ray.stages import cache

FEED_STAGE = "train_feed"
READ_BYTES = "read_bytes"  # per streamed row: bytes of the chunk it was read with (first kept row), else 0
PREFETCH_BLOCKS = 2  # decoded blocks the iterator fetches ahead of the training step
TASK_ROWS = 32  # pairs a feed task reads and decodes (whole chunks, at least one): its output block


# --------------------------------------------------------------------------- layout and order (pure)


@dataclass(frozen=True)
class ChunkLayout:
    """Chunk k holds the rows ``rows[bounds[k]:bounds[k+1]]`` (row = index in id order), which
    are row group ``row_group[k]`` of (pairs / feed) file ``file_index[k]``."""

    rows: np.ndarray  # [N] int64, rows in storage order
    bounds: np.ndarray  # [K+1] int64
    file_index: np.ndarray  # [K] int64
    row_group: np.ndarray  # [K] int64

    @property
    def num_chunks(self) -> int:
        return len(self.bounds) - 1

    def chunk_of_row(self) -> np.ndarray:
        """[N] the chunk of each row (by row)."""
        out = np.empty(len(self.rows), dtype=np.int64)
        out[self.rows] = np.repeat(np.arange(self.num_chunks), np.diff(self.bounds))
        return out


def singleton_layout(n: int) -> ChunkLayout:
    """One row per chunk (rows in id order): the finest shuffle; used when no storage is given."""
    return ChunkLayout(np.arange(n, dtype=np.int64), np.arange(n + 1, dtype=np.int64),
                       np.zeros(n, dtype=np.int64), np.arange(n, dtype=np.int64))


def layout_from_files(rows_per_file: list[np.ndarray], chunk_rows: int) -> ChunkLayout:
    """Chunks of ``chunk_rows`` consecutive rows within each file (a file's last chunk may be short)."""
    rows, bounds, file_index, row_group = [], [0], [], []
    for f, file_rows in enumerate(rows_per_file):
        for g, start in enumerate(range(0, len(file_rows), chunk_rows)):
            part = file_rows[start: start + chunk_rows]
            rows.append(part)
            bounds.append(bounds[-1] + len(part))
            file_index.append(f)
            row_group.append(g)
    cat = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    return ChunkLayout(cat, np.asarray(bounds, np.int64), np.asarray(file_index, np.int64), np.asarray(row_group, np.int64))


def feed_shards(global_batch: int, shards: int) -> int:
    """The canonical shards P of a global batch: the largest divisor of B that is at most
    ``train.feed_shards`` (so every shard has B/P slots)."""
    return max(d for d in range(1, min(shards, global_batch) + 1) if global_batch % d == 0)


MIN_CHUNKS_PER_SHARD = 16


def feed_chunk_rows(n_pairs: int, chunk_rows: int, shards: int) -> int:
    """The chunk size used: ``train.feed_chunk_rows``, smaller for small data so that each of the
    P shards gets at least :data:`MIN_CHUNKS_PER_SHARD` chunks (shard loads differ by at most
    one chunk, so this bounds the pairs an epoch leaves out)."""
    return max(1, min(chunk_rows, n_pairs // (shards * MIN_CHUNKS_PER_SHARD)))


@dataclass(frozen=True)
class FeedOrder:
    """Everything that places a pair in an epoch (ids-only; the same on the driver and on every rank)."""

    layout: ChunkLayout
    codes: np.ndarray  # [N] the partition codes training sees, by row
    global_batch: int
    shards: int  # P, a divisor of global_batch (see :func:`feed_shards`)
    seed: int

    def positions(self, phase: tuple[int, ...], epoch: int) -> np.ndarray:
        return epoch_positions(self.layout, self.codes, phase, self.seed, epoch, self.global_batch, self.shards)

    def steps(self, phase: tuple[int, ...], epoch: int) -> int:
        return int((self.positions(phase, epoch) >= 0).sum()) // self.global_batch


def epoch_positions(layout: ChunkLayout, codes: np.ndarray, phase: tuple[int, ...], seed: int, epoch: int,
                    global_batch: int, shards: int) -> np.ndarray:
    """Each row's position in epoch ``epoch``'s global order, or -1 when it is not trained on.

    Args:
        codes: [N] partition codes by row. shards: P, must divide ``global_batch``.
    Returns:
        [N] int64; positions 0..steps*B-1 appear once each (see the module docstring).
    """
    if global_batch % shards:
        raise ValueError(f"feed shards {shards} do not divide the global batch {global_batch}")
    n, k_chunks, per = len(codes), layout.num_chunks, global_batch // shards
    positions = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return positions
    in_phase = np.isin(np.asarray(codes), phase)[layout.rows]  # by storage slot
    sizes = np.diff(layout.bounds)
    load_of_chunk = np.add.reduceat(in_phase.astype(np.int64), layout.bounds[:-1]) if k_chunks else np.zeros(0, np.int64)
    load_of_chunk[sizes == 0] = 0
    rng = np.random.default_rng([seed, epoch])
    chunk_order = rng.permutation(k_chunks)
    key = rng.random(n)  # the in-chunk order, by storage slot
    owner = np.full(k_chunks, -1, dtype=np.int64)
    load = np.zeros(shards, dtype=np.int64)
    for k in chunk_order:  # greedy: the next chunk goes to the least-loaded shard (lowest index on ties)
        if load_of_chunk[k]:
            p = int(np.argmin(load))
            owner[k], load[p] = p, load[p] + load_of_chunk[k]
    steps = int((load // per).min())
    chunk_rank = np.empty(k_chunks, dtype=np.int64)
    chunk_rank[chunk_order] = np.arange(k_chunks)
    slots = np.flatnonzero(in_phase)
    chunk = np.repeat(np.arange(k_chunks), sizes)[slots]
    slots = slots[np.lexsort((key[slots], chunk_rank[chunk], owner[chunk]))]
    shard_of = owner[np.repeat(np.arange(k_chunks), sizes)[slots]]
    for p in range(shards):
        stream = slots[shard_of == p][: steps * per]
        j = np.arange(len(stream))
        positions[layout.rows[stream]] = (j // per) * global_batch + p * per + j % per
    return positions


def rank_chunks(order: FeedOrder, positions: np.ndarray, lo: int, hi: int, start_step: int) -> list[dict]:
    """The chunk descriptors rank slots [lo, hi) read from ``start_step`` on, ordered by the first
    position each one supplies: {file_index, row_group, rows, positions}."""
    B = order.global_batch
    slot = positions % B
    mine = (positions >= start_step * B) & (slot >= lo) & (slot < hi)
    chunk_of = order.layout.chunk_of_row()
    rows = np.flatnonzero(mine)
    items = []
    for k in np.unique(chunk_of[rows]):
        r = rows[chunk_of[rows] == k]
        items.append({"file_index": int(order.layout.file_index[k]), "row_group": int(order.layout.row_group[k]),
                      "rows": r.tolist(), "positions": positions[r].tolist(), "first": int(positions[r].min())})
    return sorted(items, key=lambda item: item["first"])


# --------------------------------------------------------------------------- storage


def _file_ids(uri: str) -> np.ndarray:
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as handle:
        return pq.read_table(handle, columns=[tables.ID]).column(tables.ID).to_numpy(zero_copy_only=False).astype(str)


def pairs_files(pairs_uri: str) -> list[tuple[str, np.ndarray]]:
    """The pairs' Parquet files with their ids, in the order of each file's smallest id (files
    without rows last, by name).

    Why not the files' name order: a Ray Data write names its files with a random write id and
    task index, and which task wrote which rows changes from run to run, so two ingests of the
    same manifest list the same files in different name orders. Ordered by content, the chunk
    layout, and with it every epoch's order of pairs (:func:`feed_order`), is the same for both.
    """
    files = [(uri, _file_ids(uri)) for uri in storage.list_files(pairs_uri, ".parquet")]
    return sorted(files, key=lambda f: (len(f[1]) == 0, str(min(f[1])) if len(f[1]) else "", f[0]))


def chunk_layout(pairs_uri: str, ids: np.ndarray, chunk_rows: int) -> ChunkLayout:
    """The chunks of the pairs files (in :func:`pairs_files` order, ``chunk_rows`` rows each), read
    from the id column only. ``ids``: every pair's id, sorted (row = index into it)."""
    rows_per_file = []
    for uri, file_ids in pairs_files(pairs_uri):
        rows = np.searchsorted(ids, file_ids)
        if len(rows) and ((rows >= len(ids)) | (ids[np.minimum(rows, len(ids) - 1)] != file_ids)).any():
            raise ValueError(f"ingest pairs ({storage.redact(uri)}): an id is not among the training ids")
        rows_per_file.append(rows.astype(np.int64))
    return layout_from_files(rows_per_file, chunk_rows)


def feed_uri(output_dir: str, ingest: cache.StageOutput, embed: cache.StageOutput, cluster: cache.StageOutput,
             k: int, chunk_rows: int) -> str:
    """The feed's directory, keyed by what it holds (not by sigma, objective or the optimiser)."""
    return cache.stage_uri(output_dir, FEED_STAGE, cache.content_key(FEED_STAGE, ingest, embed, cluster, k, chunk_rows))


def _write_feed_file(item: dict, meta: pa.Table, chunk_rows: int, out_uri: str, where: str) -> dict:
    """Ray Data UDF: pairs file ``item['source']`` joined with ``meta``, written with row groups of
    exactly ``chunk_rows`` rows (streamed: one chunk in memory at a time)."""
    from pacl_ray.stages.train_data import _join_meta

    fs, path = storage.resolve(item["source"])
    out_fs, out_path = storage.resolve(out_uri)
    pending, written, writer = None, 0, None
    with fs.open_input_file(path) as handle:
        reader = pq.ParquetFile(handle)
        for batch in reader.iter_batches(batch_size=chunk_rows, columns=[tables.ID, "image"]):
            joined = _join_meta(pa.Table.from_batches([batch]), meta, where)
            pending = joined if pending is None else pa.concat_tables([pending, joined])
            while pending.num_rows >= chunk_rows:
                writer = writer or pq.ParquetWriter(out_path, pending.schema, filesystem=out_fs)
                writer.write_table(pending.slice(0, chunk_rows), row_group_size=chunk_rows)
                written += chunk_rows
                pending = pending.slice(chunk_rows)
    if pending is not None and pending.num_rows:
        writer = writer or pq.ParquetWriter(out_path, pending.schema, filesystem=out_fs)
        writer.write_table(pending, row_group_size=chunk_rows)
        written += pending.num_rows
    if writer:
        writer.close()
    return {"index": item["index"], "rows": written}


def write_feed(uri: str, pairs_uri: str, meta: pa.Table, chunk_rows: int) -> list[str]:
    """Write (once; cached at ``uri``) the feed files, one per pairs file; returns their URIs in
    layout order. ``meta``: the join of :func:`~pacl_ray.stages.train_data.load_training_table`
    without the partition column (the feed does not depend on the partition stage)."""
    import ray

    sources = [uri for uri, _ in pairs_files(pairs_uri)]  # the layout's file order
    targets = [storage.join(uri, f"part-{i:05d}.parquet") for i in range(len(sources))]
    if cache.is_complete(uri):
        return targets
    storage.makedirs(uri)
    items = [{"index": i, "source": s} for i, s in enumerate(sources)]
    ds = ray.data.from_items(items, override_num_blocks=max(len(items), 1))
    written = ds.map(_write_feed_file_row, fn_kwargs=dict(meta=meta, chunk_rows=chunk_rows, targets=targets,
                                                          where=f"ingest pairs ({storage.redact(pairs_uri)})")).take_all()
    cache.mark_complete(uri, {"files": len(targets), "rows": sum(int(r["rows"]) for r in written),
                              "chunk_rows": chunk_rows})
    return targets


def _write_feed_file_row(item: dict, meta: pa.Table, chunk_rows: int, targets: list[str], where: str) -> dict:
    return _write_feed_file(item, meta, chunk_rows, targets[int(item["index"])], where)


def _read_chunks(batch: pa.Table, files: list[str]) -> pa.Table:
    """Ray Data UDF: read each described chunk's row group, keep its listed rows, attach their
    positions, partition codes and the bytes read (on the chunk's first kept row)."""
    out = []
    for item in batch.to_pylist():
        fs, path = storage.resolve(files[item["file_index"]])
        with fs.open_input_file(path) as handle:
            reader = pq.ParquetFile(handle)
            group = reader.read_row_group(item["row_group"])
            meta = reader.metadata.row_group(item["row_group"])
            size = sum(meta.column(c).total_compressed_size for c in range(meta.num_columns))
        rows = group.column("row").to_numpy()
        want = dict(zip(item["rows"], zip(item["positions"], item["partition"])))
        keep = np.flatnonzero(np.isin(rows, item["rows"]))
        if len(keep) != len(item["rows"]):
            raise ValueError(f"train feed ({storage.redact(files[item['file_index']])}): row group "
                             f"{item['row_group']} lacks rows the layout places there; delete the feed to rebuild it")
        table = group.take(pa.array(keep))
        kept_rows = rows[keep]
        read = np.zeros(len(keep), dtype=np.int64)
        read[0] = size
        table = (table.append_column("position", pa.array([want[int(r)][0] for r in kept_rows], pa.int64()))
                 .append_column("partition", pa.array([want[int(r)][1] for r in kept_rows], pa.int64()))
                 .append_column(READ_BYTES, pa.array(read)))
        out.append(table)
    return pa.concat_tables(out)


def rank_dataset(files: list[str], order: FeedOrder, phase: tuple[int, ...], epoch: int, start_step: int,
                 lo: int, hi: int, decode, object_store_mb: float):
    """The Ray Dataset streaming rank slots [lo, hi) of the epoch from ``start_step`` on (decoded
    rows with their ``position``, ``partition`` and :data:`READ_BYTES`), chunks in the order their
    first rows are needed; None when the rank has no rows.

    ``object_store_mb`` (``train.feed_object_store_mb``, MiB, > 0) is the pipeline's object-store
    budget: Ray Data's ``execution_options.resource_limits.object_store_memory`` on this
    dataset's own DataContext (a copy; the process-wide context is untouched). The streaming
    executor counts blocks queued between operators, outputs of running tasks and the iterator's
    prefetched batches against it and starts no read-and-decode task whose output (a block of
    about :data:`TASK_ROWS` decoded pairs, at least one chunk) would exceed it, so the feed's
    object-store use stays about this budget plus one task's output, whatever the dataset size
    (Ray Data: a soft limit; one task at a time always runs; the tasks started before the first
    output's size is known, at most one per CPU, can overshoot it once).
    """
    import ray

    if not object_store_mb > 0:
        raise ValueError(f"train.feed_object_store_mb = {object_store_mb!r}: must be > 0 (MiB per worker)")
    positions = order.positions(phase, epoch)
    items = rank_chunks(order, positions, lo, hi, start_step)
    if not items:
        return None
    for item in items:  # each chunk carries its rows' codes: no per-dataset array is shipped to the tasks
        item["partition"] = order.codes[item["rows"]].astype(np.int64).tolist()
    # One task per block of descriptors (ids and positions only), about TASK_ROWS pairs (at least
    # one chunk): it reads, then decodes its whole block (batch_size=None) into one output block.
    # A decode batch size would make Ray Data bundle that many *descriptors* (chunks) per task, and
    # a task's output is what the budget cannot split.
    mean_rows = sum(len(item["rows"]) for item in items) / len(items)
    per_task = max(1, int(TASK_ROWS // mean_rows))
    ds = ray.data.from_items(items, override_num_blocks=-(-len(items) // per_task))
    ds = ds.map_batches(_read_chunks, fn_kwargs=dict(files=files), batch_format="pyarrow", batch_size=1)
    ds = ds.map_batches(decode, batch_format="pyarrow", batch_size=None)
    context = ds.context
    # Order must survive every operator (the merge below relies on chunks arriving by first position).
    context.execution_options.preserve_order = True
    context.execution_options.resource_limits = context.execution_options.resource_limits.copy(
        object_store_memory=int(object_store_mb * 2**20))
    context.enable_progress_bars = False
    return ds


def stream_rank_batches(files: list[str], order: FeedOrder, phase: tuple[int, ...], epoch: int, start_step: int,
                        lo: int, hi: int, decode, device, object_store_mb: float) -> Iterator[dict]:
    """This rank's batches (slots [lo, hi) of each global batch) of the epoch from ``start_step``
    on, streamed from the feed files through :func:`rank_dataset` (object-store budget
    ``object_store_mb`` MiB); ``decode(pa.Table) -> dict of numpy`` runs on Ray Data CPU tasks."""
    ds = rank_dataset(files, order, phase, epoch, start_step, lo, hi, decode, object_store_mb)
    if ds is None:
        return
    B, width = order.global_batch, hi - lo
    pending: dict[str, np.ndarray] = {}
    step = start_step
    # A batch is one task's decoded block; the prefetched ones count against the budget.
    for batch in ds.iter_batches(batch_format="numpy", prefetch_batches=PREFETCH_BLOCKS, batch_size=None):
        pending = {k: np.concatenate([pending[k], v]) if pending else v for k, v in batch.items()}
        while pending and ((pending["position"] // B) == step).sum() == width:
            here = np.flatnonzero(pending["position"] // B == step)
            here = here[np.argsort(pending["position"][here])]
            yield {k: torch.from_numpy(np.ascontiguousarray(v[here])).to(device) for k, v in pending.items()}
            rest = np.ones(len(pending["position"]), dtype=bool)
            rest[here] = False
            pending = {k: v[rest] for k, v in pending.items()}
            step += 1
