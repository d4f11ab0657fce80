"""Stage 3's data: the training plan (phases, steps, epoch order), the driver-side join and the
per-worker batches (paper 3.3, Eqs. 15-17; SPEC "Choice (empty phases)").

Data. The driver joins the four upstream tables by ``id`` into one metadata table (cached text
feature, partition code, the factual and emotional pseudo-labels of K, and ``row``, the pair's
index in id order); image bytes stay in storage. Each epoch's global order and each rank's share
of it are defined in :mod:`pacl_ray.stages.train_feed` from ids alone, the same for every worker
count. Data over ``train.in_memory_max_mb`` streams: each rank reads only the chunks of its shards
from the cached feed files (about 1/W of the image bytes per epoch) through Ray Data, decoding on
CPU tasks. Small data skips Ray Data: the driver reads and joins it into one Arrow table in the
object store, and each worker selects, orders and decodes the same rows itself, giving the same
batches without a pipeline start per epoch (seconds each, more than a small epoch's steps).

Deterministic order. Global step s holds positions [s*B, (s+1)*B); rank r of W takes the
contiguous slots [B*r//W, B*(r+1)//W) of it, so the gathered global batch is the same batch, in
the same order, whatever W. Augmentation randomness is seeded per (seed, epoch, row). We do not
use ``get_dataset_shard``: ``streaming_split`` hands blocks to workers dynamically, which would
make the batches depend on timing and worker count and a resumed epoch impossible to replay.
Pairs that do not fill the epoch's last global batch are dropped (as open_clip does); an epoch
whose phase holds fewer pairs than one global batch therefore takes no step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pacl_ray.config import RunConfig
from pacl_ray.core import loss
from pacl_ray.config import thresholds
from pacl_ray.core.partitions import PARTITION_CODES, PARTITION_NAMES, partition_counts
from pacl_ray.formats import storage, tables
from pacl_ray.stages import cache
from pacl_ray.stages.cache import StageOutput
from pacl_ray.stages.embed import load_features
from pacl_ray.stages.ingest import read_pairs_table
from pacl_ray.stages.partition import read_scores
from pacl_ray.stages.pseudo_labels import load_labels
from pacl_ray.stages.train_feed import (
    READ_BYTES, ChunkLayout, FeedOrder, feed_shards, singleton_layout, stream_rank_batches,
)

PARTITION = "partition"
FACTUAL = "factual_pseudo_label"  # image-side k-means cluster of the pair (paper 3.2)
EMOTIONAL = "emotional_pseudo_label"  # text-side k-means cluster of the pair (paper 3.2)
OBJECTIVES = ("pacl", "clip")
DEFAULT_FEED_SHARDS = 16  # TrainConfig.feed_shards' default
DEFAULT_FEED_OBJECT_STORE_MB = 256.0  # TrainConfig.feed_object_store_mb's default


class NoTrainableEpochError(ValueError):
    """No epoch's phase holds a full global batch, so the run would take no step at all."""


# --------------------------------------------------------------------------- the plan (pure)


def objective_plan(
    objective: str, schedule: str, epochs: int, codes: np.ndarray, partitions: Iterable[int] = PARTITION_CODES,
) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """The partition codes training sees and each epoch's phase, for ``train.objective``.

    ``pacl``: the scored codes and the schedule's phases (Eqs. 15-17). ``clip`` (vanilla
    contrastive): every pair strong-coupled and trained on in every epoch. The only place the
    objective changes what is trained on. Each phase is then cut to ``partitions``
    (``train.partitions``, the codes ever used; SPEC "Choice (sample usage, Table 4)"), so a phase
    may become empty, and such an epoch takes no step.
    """
    codes = np.asarray(codes, dtype=np.int64)
    used = set(int(code) for code in partitions)
    if not used or not used <= set(PARTITION_CODES):
        raise ValueError(f"train.partitions must be a non-empty subset of {list(PARTITION_CODES)}, got {list(partitions)}")
    if objective == "clip":
        codes, phases = np.full_like(codes, loss.STRONG), [(loss.STRONG,)] * epochs
    elif objective == "pacl":
        phases = [loss.phase_partitions(e, epochs, schedule) for e in range(epochs)]
    else:
        raise ValueError(f"train.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    return codes, [tuple(code for code in phase if code in used) for phase in phases]


def epoch_phases(cfg: RunConfig) -> list[tuple[int, ...]]:
    """Partitions trained on in each epoch (``clip``: every pair is code 1, all data always), cut to
    ``train.partitions``."""
    return objective_plan(cfg.train.objective, cfg.train.schedule, cfg.train.epochs, np.empty(0),
                          cfg.train.partitions)[1]


def phase_rows(partition: np.ndarray, phase: tuple[int, ...]) -> np.ndarray:
    return np.flatnonzero(np.isin(partition, phase))


def steps_per_epoch(partition: np.ndarray, phases: list[tuple[int, ...]], global_batch: int,
                    layout: Optional[ChunkLayout] = None, seed: int = 0, shards: int = DEFAULT_FEED_SHARDS) -> list[int]:
    """Full global batches per epoch (0 = an empty phase). With one-row chunks (``layout`` None)
    this is ``pairs // global_batch``; with a storage layout see :mod:`pacl_ray.stages.train_feed`."""
    order = feed_order(partition, global_batch, seed, shards, layout)
    return [order.steps(phase, e) for e, phase in enumerate(phases)]


def feed_order(codes: np.ndarray, global_batch: int, seed: int, shards: int,
               layout: Optional[ChunkLayout] = None) -> FeedOrder:
    """The epoch order of ``codes`` [N] (by row) with ``train.feed_shards`` = ``shards``."""
    codes = np.asarray(codes, dtype=np.int64)
    return FeedOrder(layout if layout is not None else singleton_layout(len(codes)), codes, global_batch,
                     feed_shards(global_batch, shards), seed)


def format_counts(counts: dict[int, int]) -> str:
    return ", ".join(f"{code} {PARTITION_NAMES[code]}: {counts.get(code, 0)}" for code in PARTITION_CODES)


@dataclass(frozen=True)
class TrainingPlan:
    """What each epoch trains on. ``counts`` are the scored partition counts (before the
    objective's view), ``pairs[e]`` the pairs in epoch e's phase, ``steps[e]`` its global steps."""

    phases: list[tuple[int, ...]]
    steps: list[int]
    pairs: list[int]
    counts: dict[int, int]
    global_batch: int

    @property
    def total_steps(self) -> int:
        return sum(self.steps)

    def skipped(self) -> list[int]:
        """Epochs that take no step (SPEC "Choice (empty phases)")."""
        return [e for e, n in enumerate(self.steps) if n == 0]

    def skip_note(self, epoch: int) -> str:
        phase = "".join(map(str, self.phases[epoch])) or "(none of train.partitions)"
        return (f"phase {phase} holds {self.pairs[epoch]} pairs, fewer than one global batch of {self.global_batch}: "
                f"no step (partition counts {format_counts(self.counts)})")


def make_plan(cfg: RunConfig, scored_codes: np.ndarray, layout: Optional[ChunkLayout] = None) -> tuple[np.ndarray, TrainingPlan]:
    """(codes training sees [N] int64, the plan) for scored codes [N]; ``layout``: the pairs'
    storage chunks (None = one row per chunk).

    Raises:
        NoTrainableEpochError: when no epoch can take a step; names sigma, the calibrations and the
            partition counts (SPEC "Choice (empty phases)").
    """
    codes, phases = objective_plan(cfg.train.objective, cfg.train.schedule, cfg.train.epochs, scored_codes,
                                   cfg.train.partitions)
    batch = cfg.train.global_batch_size
    pairs = [len(phase_rows(codes, phase)) for phase in phases]
    steps = steps_per_epoch(codes, phases, batch, layout, cfg.seed, cfg.train.feed_shards)
    plan = TrainingPlan(phases, steps, pairs, partition_counts(scored_codes), batch)
    if plan.total_steps == 0:
        sigma_f, sigma_e = thresholds(cfg.partition)
        raise NoTrainableEpochError(
            f"train: no epoch can take a step: every phase holds fewer pairs than one global batch of {batch} "
            f"(partition.sigma={cfg.partition.sigma} -> factual {sigma_f} on the {cfg.partition.factual_calibration} "
            f"calibration, emotional {sigma_e} on the {cfg.partition.emotional_calibration} calibration; partition "
            f"counts {format_counts(plan.counts)}; train.objective={cfg.train.objective}, "
            f"train.schedule={cfg.train.schedule}, train.partitions={cfg.train.partitions}, {len(scored_codes)} "
            f"pairs). Lower train.global_batch_size or choose a sigma that leaves pairs in the trained phases."
        )
    return codes, plan


def epoch_positions(partition: np.ndarray, phase: tuple[int, ...], seed: int, epoch: int, global_batch: int,
                    layout: Optional[ChunkLayout] = None, shards: int = DEFAULT_FEED_SHARDS) -> np.ndarray:
    """Each row's position in the epoch's global order, or -1 when it is not trained on.

    Args:
        partition: [N] codes by row (row = index in id order).
    Returns:
        [N] int64; positions 0..steps*B-1 appear once each, a seeded order of the phase's rows
        (:func:`pacl_ray.stages.train_feed.epoch_positions`).
    """
    return feed_order(partition, global_batch, seed, shards, layout).positions(phase, epoch)


def rank_slots(global_batch: int, rank: int, world_size: int) -> tuple[int, int]:
    """The slots [lo, hi) of every global batch that ``rank`` trains on (contiguous, rank order)."""
    return global_batch * rank // world_size, global_batch * (rank + 1) // world_size


def seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# --------------------------------------------------------------------------- driver-side join


def _align(table: pa.Table, ids: np.ndarray, where: str) -> pa.Table:
    """``table`` reordered to ``ids`` (sorted); every id must be present exactly once."""
    table_ids = table.column(tables.ID).to_numpy(zero_copy_only=False).astype(str)
    order = np.argsort(table_ids, kind="stable")
    sorted_ids = table_ids[order]
    dupes = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
    if len(dupes):
        raise ValueError(f"{where}: id {dupes[0]!r} appears more than once")
    idx = np.searchsorted(sorted_ids, ids)
    found = (idx < len(sorted_ids)) & (sorted_ids[np.minimum(idx, len(sorted_ids) - 1)] == ids)
    if not found.all():
        raise ValueError(f"{where}: no row for id {ids[~found][0]!r}")
    return table.take(pa.array(order[idx]))


def load_training_table(ingest: StageOutput, partition: StageOutput, embed: StageOutput, cluster: StageOutput,
                        k: int) -> pa.Table:
    """One row per pair, in id order: id, row, partition (the scored code 1-4),
    factual_pseudo_label, emotional_pseudo_label (int64, of K = ``k``), text_feature.

    Image bytes stay out of the driver: the feed (:mod:`pacl_ray.stages.train_feed`) or, for small
    data, :func:`joined_table` joins them.
    """
    pairs_uri = ingest.path("pairs")
    ids = np.sort(read_pairs_table(ingest, [tables.ID]).column(tables.ID).to_numpy(zero_copy_only=False).astype(str))
    if len(ids) == 0:
        raise ValueError(f"ingest pairs ({storage.redact(pairs_uri)}): no rows to train on")
    if (ids[1:] == ids[:-1]).any():
        raise ValueError(f"ingest pairs: id {ids[1:][ids[1:] == ids[:-1]][0]!r} appears more than once")
    scores_uri, labels_uri, feats_uri = partition.path("scores"), cluster.path("labels"), embed.path("features")
    scores = _align(read_scores(partition, [tables.ID, PARTITION]), ids,
                    f"partition scores ({storage.redact(scores_uri)})")
    fcol, ecol = "factual_label", "emotional_label"
    labels = _align(load_labels(cluster, k), ids, f"cluster labels ({storage.redact(labels_uri)}, train.k={k})")
    feats = _align(load_features(embed, [tables.ID, "text_feature"]), ids,
                   f"embed features ({storage.redact(feats_uri)})")

    codes = scores.column(PARTITION).to_numpy(zero_copy_only=False).astype(np.int64)
    bad = ~np.isin(codes, PARTITION_CODES)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"partition scores ({storage.redact(scores_uri)}): id {ids[i]!r} field 'partition' = "
                         f"{codes[i]} (expected one of {PARTITION_CODES})")
    text = feats.column("text_feature").combine_chunks()
    return pa.table({
        tables.ID: pa.array(ids),
        "row": pa.array(np.arange(len(ids), dtype=np.int64)),
        PARTITION: pa.array(codes),
        FACTUAL: pc.cast(labels.column(fcol), pa.int64()),
        EMOTIONAL: pc.cast(labels.column(ecol), pa.int64()),
        "text_feature": pc.cast(text, pa.list_(pa.float32(), text.type.list_size)),
    })


def with_codes(meta: pa.Table, codes: np.ndarray) -> pa.Table:
    """``meta`` with its partition column replaced by the codes training sees (see :func:`make_plan`)."""
    return meta.set_column(meta.schema.get_field_index(PARTITION), PARTITION, pa.array(np.asarray(codes, np.int64)))


def _join_meta(batch: pa.Table, meta: pa.Table, where: str) -> pa.Table:
    """Ray Data UDF: add each pair's metadata row (looked up by id) to a batch of (id, image)."""
    meta_ids = meta.column(tables.ID).to_numpy(zero_copy_only=False).astype(str)
    ids = batch.column(tables.ID).to_numpy(zero_copy_only=False).astype(str)
    idx = np.searchsorted(meta_ids, ids)
    ok = (idx < len(meta_ids)) & (meta_ids[np.minimum(idx, len(meta_ids) - 1)] == ids)
    if not ok.all():
        raise ValueError(f"{where}: id {ids[~ok][0]!r} has no metadata row")
    rows = meta.take(pa.array(idx)).drop_columns([tables.ID])
    out = batch.select([tables.ID, "image"])
    for name in rows.column_names:
        out = out.append_column(name, rows.column(name))
    return out


def joined_table(ingest: StageOutput, meta: pa.Table) -> pa.Table:
    """The pairs' (id, image) joined with ``meta``, read into one in-memory table (for small data)."""
    pairs = read_pairs_table(ingest, [tables.ID, "image"])
    return _join_meta(pairs, meta, where=f"ingest pairs ({storage.redact(ingest.path('pairs'))})")


def fits_in_memory(ingest: StageOutput, max_mb: float) -> bool:
    """Whether the pairs' Parquet files (mostly encoded images) total at most ``max_mb``."""
    files = cache.table_files(ingest, "pairs")
    return sum(fs.get_file_info(path).size for fs, path in map(storage.resolve, files)) <= max_mb * 2**20


# --------------------------------------------------------------------------- worker-side data


def _select_rank_rows(batch: pa.Table, positions: np.ndarray, lo: int, hi: int, global_batch: int, start_step: int) -> pa.Table:
    """Keep this rank's rows of steps >= ``start_step`` and attach their epoch position."""
    pos = positions[batch.column("row").to_numpy()]
    slot = pos % global_batch
    keep = (pos >= start_step * global_batch) & (slot >= lo) & (slot < hi)
    return batch.filter(pa.array(keep)).append_column("position", pa.array(pos[keep]))


def _decode_batch(batch: pa.Table, transform, seed: int, epoch: int) -> dict[str, np.ndarray]:
    """Decode images and apply the train transform with randomness seeded per (seed, epoch, row).

    JPEGs are decoded at reduced scale (draft mode) down to the shorter side the transform's
    random-resized crop needs so that no crop is enlarged
    (:func:`pacl_ray.formats.images.min_side_for`; 366 px for 224 px at crop scale >= 0.5).

    Returns numpy columns: image [b, 3, H, W] in the transform's dtype (uint8 from
    :func:`pacl_ray.core.pacl_model.train_transform`: the training step normalises on the device,
    :class:`pacl_ray.stages.train_step.ImageNormalizer`), text_feature float32 [b, D], partition,
    factual_pseudo_label, emotional_pseudo_label, position int64 [b].
    """
    from pacl_ray.formats.images import decode_rgb, min_side_for

    min_side = min_side_for(transform)
    rows = batch.column("row").to_numpy()
    images = []
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        for row, data in zip(rows, batch.column("image").to_pylist()):
            s = seed_of(seed, epoch, row)
            random.seed(s)  # timm/torchvision transforms draw from both generators
            # the CPU generator only: torch.manual_seed also seeds every accelerator (~0.25 ms)
            torch.default_generator.manual_seed(s)
            images.append(transform(decode_rgb(data, min_side=min_side)).numpy())
    random.setstate(py_state)
    text = batch.column("text_feature").combine_chunks()
    width = text.type.list_size
    out: dict[str, Any] = {
        "image": np.stack(images),  # uint8 stays uint8: a quarter of float32's bytes through Ray Data
        "text_feature": text.flatten().to_numpy(zero_copy_only=False).reshape(-1, width).astype(np.float32),
    }
    for name in (PARTITION, FACTUAL, EMOTIONAL, "position"):
        out[name] = batch.column(name).to_numpy().astype(np.int64)
    if READ_BYTES in batch.column_names:
        out[READ_BYTES] = batch.column(READ_BYTES).to_numpy().astype(np.int64)
    return out


def rank_batches(source, order: FeedOrder, phase: tuple[int, ...], epoch: int, start_step: int, rank: int,
                 world_size: int, transform, device, read_bytes: Optional[list] = None,
                 object_store_mb: float = DEFAULT_FEED_OBJECT_STORE_MB) -> Iterator[dict]:
    """This rank's batches of the epoch from global step ``start_step`` on, in global order.

    ``source``: the feed files (a list of URIs, streamed by Ray Data; see
    :mod:`pacl_ray.stages.train_feed`) or, for small data, the joined rows as one in-memory
    ``pyarrow.Table`` (:func:`joined_table`); both give the same batches. ``read_bytes``: when a
    list, each streamed batch's bytes read from storage are appended to it. ``object_store_mb``:
    the streamed feed's object-store budget (``train.feed_object_store_mb``, MiB).
    """
    lo, hi = rank_slots(order.global_batch, rank, world_size)
    if hi == lo:
        return iter(())
    if isinstance(source, pa.Table):
        return _local_rank_batches(source, order, phase, epoch, start_step, lo, hi, transform, device)
    decode = _Decode(transform, order.seed, epoch)
    return _drop_read_bytes(stream_rank_batches(list(source), order, phase, epoch, start_step, lo, hi, decode, device,
                                                object_store_mb), read_bytes)


class _Decode:
    """Ray Data UDF: :func:`_decode_batch` with the epoch's seed (a picklable callable)."""

    def __init__(self, transform, seed: int, epoch: int):
        self.transform, self.seed, self.epoch = transform, seed, epoch

    def __call__(self, batch: pa.Table) -> dict:
        return _decode_batch(batch, self.transform, self.seed, self.epoch)


def _drop_read_bytes(batches: Iterator[dict], read_bytes: Optional[list]) -> Iterator[dict]:
    for batch in batches:
        n = batch.pop(READ_BYTES)
        if read_bytes is not None:
            read_bytes.append(int(n.sum()))
        yield batch


def _local_rank_batches(table: pa.Table, order: FeedOrder, phase: tuple[int, ...], epoch: int, start_step: int,
                        lo: int, hi: int, transform, device) -> Iterator[dict]:
    """:func:`rank_batches` from an in-memory table: the same row selection, order and decode,
    without a Ray Data pipeline per epoch. On a small dataset that pipeline's start and teardown
    cost seconds per epoch while the steps themselves take a fraction of that."""
    # Rows outside the phase have position -1, so the selection also applies the phase filter.
    positions = order.positions(phase, epoch)
    mine = _select_rank_rows(table, positions, lo, hi, order.global_batch, start_step).sort_by("position")
    for start in range(0, mine.num_rows, hi - lo):
        batch = _decode_batch(mine.slice(start, hi - lo), transform, order.seed, epoch)
        yield {name: torch.from_numpy(value).to(device) for name, value in batch.items()}
