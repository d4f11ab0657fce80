"""Stage 3 (paper 3.3): partition-adaptive contrastive training on Ray Train (``TorchTrainer``).

Data. The driver joins the four upstream tables by ``id`` into one materialised Ray Dataset
(encoded image bytes, cached text feature, partition code, pseudo-labels of K, and ``row``, the
pair's index in id order). Every epoch, each worker streams its share of that dataset through Ray
Data: ``filter`` to the phase's partitions (Eqs. 15-17; filtered, never re-read), keep this rank's
rows, ``sort`` them into the epoch's order, then decode + the backbone's train transform in
``map_batches`` on CPU, and ``iter_torch_batches`` into the step. Small data (pairs' Parquet up to
``train.in_memory_max_mb``) skips Ray Data: the driver reads and joins it into one Arrow table in
the object store, and each worker selects, orders and decodes the same rows itself, giving the
same batches without a pipeline start per epoch (seconds each, more than a small epoch's steps).

Deterministic order. The epoch's global order is a seeded permutation of the phase's rows
(:func:`epoch_positions`), the same on every worker and for every worker count. Global step s
holds positions [s*B, (s+1)*B); rank r of W takes the contiguous slots [B*r//W, B*(r+1)//W) of
it, so the gathered global batch is the same batch, in the same order, whatever W. Augmentation
randomness is seeded per (seed, epoch, row) and dropout randomness per (seed, step, rank), so a
resumed run replays exactly. We do not use ``get_dataset_shard``: ``streaming_split`` hands
blocks to workers dynamically, which would make the batches depend on timing and worker count.
The last incomplete global batch of an epoch is dropped (as open_clip does).

Step. Per-rank projections -> :func:`pacl_ray.core.dist.all_gather_with_grad` (features) and
``all_gather_no_grad`` (codes, labels) -> :func:`pacl_ray.core.loss.pacl_loss` on the global batch ->
backward; DDP averages gradients, which with the gather's convention equals single-process
training on the global batch.

Elastic training. ``train.max_workers`` makes ``ScalingConfig(num_workers=(num_workers,
max_workers))``. The global batch stays ``train.global_batch_size`` at any world size W: each rank
takes B//W or B//W+1 rows of every global batch, so the loss, the learning-rate schedule and the
steps per epoch do not change when workers come or go; only the per-worker batch does.

Checkpoints (every epoch and every ``train.checkpoint_every_steps``) hold model, optimiser,
scheduler, epoch, step and the metric history; the data position is (epoch, step in epoch).
"""

from __future__ import annotations

import csv
import io
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pacl_ray.stages import cache
from pacl_ray.core import dist
from pacl_ray.core import loss
from pacl_ray.core import backbones
from pacl_ray.stages import runtime
from pacl_ray.formats import tables
from pacl_ray.formats import storage
from pacl_ray.stages.cache import StageOutput
from pacl_ray.config import RunConfig, save_config

STAGE = "train"
STATE_FILE = "state.pt"
PHASE_COLUMNS = ("L1", "L2", "L3", "L4")


@dataclass
class TrainResult:
    """What a finished (or cached) training run produced."""

    uri: str  # the run directory
    key: str
    cached: bool
    backbone_checkpoint: str  # exported backbone (safetensors)
    heads_checkpoint: str  # exported projection heads (safetensors)
    export_info: str  # export.json
    checkpoint: str  # latest Ray Train checkpoint directory
    history: list[dict] = field(default_factory=list)  # one row per epoch
    final_metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class FaultInjection:
    """Test hook: rank ``rank`` raises once, before global step ``step``; ``marker`` records it."""

    step: int
    marker: str
    rank: int = 1


# --------------------------------------------------------------------------- the data plan (pure)


def epoch_phases(cfg: RunConfig) -> list[tuple[int, ...]]:
    """Partitions trained on in each epoch (``clip``: every pair is code 1, all data always)."""
    if cfg.train.objective == "clip":
        return [(loss.STRONG,)] * cfg.train.epochs
    if cfg.train.objective != "pacl":
        raise ValueError(f"train.objective must be 'pacl' or 'clip', got {cfg.train.objective!r}")
    return [loss.phase_partitions(e, cfg.train.epochs, cfg.train.schedule) for e in range(cfg.train.epochs)]


def _phase_rows(partition: np.ndarray, phase: tuple[int, ...]) -> np.ndarray:
    return np.flatnonzero(np.isin(partition, phase))


def steps_per_epoch(partition: np.ndarray, phases: list[tuple[int, ...]], global_batch: int) -> list[int]:
    """Full global batches per epoch (the last incomplete batch is dropped)."""
    return [len(_phase_rows(partition, phase)) // global_batch for phase in phases]


def epoch_positions(partition: np.ndarray, phase: tuple[int, ...], seed: int, epoch: int, global_batch: int) -> np.ndarray:
    """Each row's position in the epoch's global order, or -1 when it is not trained on.

    Args:
        partition: [N] codes by row (row = index in id order).
    Returns:
        [N] int64; positions 0..steps*B-1 appear once each, a seeded permutation of the phase's rows.
    """
    rows = _phase_rows(partition, phase)
    order = np.random.default_rng([seed, epoch]).permutation(rows)
    order = order[: (len(rows) // global_batch) * global_batch]
    positions = np.full(len(partition), -1, dtype=np.int64)
    positions[order] = np.arange(len(order), dtype=np.int64)
    return positions


def rank_slots(global_batch: int, rank: int, world_size: int) -> tuple[int, int]:
    """The slots [lo, hi) of every global batch that ``rank`` trains on (contiguous, rank order)."""
    return global_batch * rank // world_size, global_batch * (rank + 1) // world_size


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def cosine_factor(step: int, total: int) -> float:
    """Cosine decay from 1 to 0 over ``total`` optimiser steps."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


# --------------------------------------------------------------------------- driver-side join


def _read_table(uri: str, columns: list[str], where: str) -> pa.Table:
    fs, path = storage.resolve(uri)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{where}: {uri} does not exist")
    available = pq.ParquetDataset(path, filesystem=fs).schema.names
    missing = [c for c in columns if c not in available]
    if missing:
        raise ValueError(f"{where} ({uri}): missing column {missing[0]!r} (have {available})")
    return pq.read_table(path, filesystem=fs, columns=columns)


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


def load_training_table(
    ingest: StageOutput, partition: StageOutput, embed: StageOutput, cluster: StageOutput, cfg: RunConfig
) -> pa.Table:
    """One row per pair, in id order: id, row, partition, factual, emotional, text_feature.

    Image bytes stay out of the driver; :func:`build_dataset` joins them in Ray Data.
    """
    k = cfg.train.k
    pairs_ids = _read_table(ingest.path("pairs"), [tables.ID], "ingest pairs").column(tables.ID)
    ids = np.sort(pairs_ids.to_numpy(zero_copy_only=False).astype(str))
    if len(ids) == 0:
        raise ValueError(f"ingest pairs ({ingest.path('pairs')}): no rows to train on")
    if (ids[1:] == ids[:-1]).any():
        raise ValueError(f"ingest pairs: id {ids[1:][ids[1:] == ids[:-1]][0]!r} appears more than once")
    scores = _align(_read_table(partition.path("scores"), [tables.ID, "partition"], "partition scores"), ids, f"partition scores ({partition.path('scores')})")
    fcol, ecol = tables.factual_label_column(k), tables.emotional_label_column(k)
    labels = _align(_read_table(cluster.path("labels"), [tables.ID, fcol, ecol], f"cluster labels (train.k={k})"), ids, f"cluster labels ({cluster.path('labels')})")
    feats = _align(_read_table(embed.path("features"), [tables.ID, "text_feature"], "embed features"), ids, f"embed features ({embed.path('features')})")

    codes = scores.column("partition").to_numpy(zero_copy_only=False).astype(np.int64)
    bad = (codes < 1) | (codes > 4)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"partition scores ({partition.path('scores')}): id {ids[i]!r} field 'partition' = {codes[i]} (expected 1-4)")
    if cfg.train.objective == "clip":
        codes = np.full_like(codes, loss.STRONG)  # vanilla contrastive: every pair strong-coupled
    text = feats.column("text_feature").combine_chunks()
    return pa.table(
        {
            tables.ID: pa.array(ids),
            "row": pa.array(np.arange(len(ids), dtype=np.int64)),
            "partition": pa.array(codes),
            "factual": pc.cast(labels.column(fcol), pa.int64()),
            "emotional": pc.cast(labels.column(ecol), pa.int64()),
            "text_feature": pc.cast(text, pa.list_(pa.float32(), text.type.list_size)),
        }
    )


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
    """What :func:`build_dataset` holds, read into one in-memory table (for small data)."""
    pairs = _read_table(ingest.path("pairs"), [tables.ID, "image"], "ingest pairs")
    return _join_meta(pairs, meta, where=f"ingest pairs ({ingest.path('pairs')})")


def fits_in_memory(ingest: StageOutput, max_mb: float) -> bool:
    """Whether the pairs' Parquet files (mostly encoded images) total at most ``max_mb``."""
    files = storage.list_files(ingest.path("pairs"), ".parquet")
    return sum(fs.get_file_info(path).size for fs, path in map(storage.resolve, files)) <= max_mb * 2**20


def build_dataset(ingest: StageOutput, meta: pa.Table):
    """The materialised Ray Dataset every epoch filters: image bytes joined with ``meta``."""
    import ray

    pairs = ray.data.read_parquet(ingest.path("pairs"), columns=[tables.ID, "image"])
    joined = pairs.map_batches(
        _join_meta, fn_kwargs=dict(meta=meta, where=f"ingest pairs ({ingest.path('pairs')})"), batch_format="pyarrow",
    )
    return joined.materialize()


# --------------------------------------------------------------------------- worker-side data


def _select_rank_rows(batch: pa.Table, positions: np.ndarray, lo: int, hi: int, global_batch: int, start_step: int) -> pa.Table:
    """Keep this rank's rows of steps >= ``start_step`` and attach their epoch position."""
    pos = positions[batch.column("row").to_numpy()]
    slot = pos % global_batch
    keep = (pos >= start_step * global_batch) & (slot >= lo) & (slot < hi)
    return batch.filter(pa.array(keep)).append_column("position", pa.array(pos[keep]))


def _decode_batch(batch: pa.Table, transform, seed: int, epoch: int) -> dict[str, np.ndarray]:
    """Decode images and apply the train transform with randomness seeded per (seed, epoch, row).

    Returns numpy columns: image float32 [b, 3, H, W], text_feature float32 [b, D], partition,
    factual, emotional, position int64 [b].
    """
    from pacl_ray.formats.images import decode_rgb

    rows = batch.column("row").to_numpy()
    images = []
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        for row, data in zip(rows, batch.column("image").to_pylist()):
            s = _seed_of(seed, epoch, row)
            random.seed(s)  # timm/torchvision transforms draw from both generators
            # the CPU generator only: torch.manual_seed also seeds every accelerator (~0.25 ms)
            torch.default_generator.manual_seed(s)
            images.append(transform(decode_rgb(data)).numpy())
    random.setstate(py_state)
    text = batch.column("text_feature").combine_chunks()
    width = text.type.list_size
    return {
        "image": np.stack(images).astype(np.float32),
        "text_feature": text.flatten().to_numpy(zero_copy_only=False).reshape(-1, width).astype(np.float32),
        "partition": batch.column("partition").to_numpy().astype(np.int64),
        "factual": batch.column("factual").to_numpy().astype(np.int64),
        "emotional": batch.column("emotional").to_numpy().astype(np.int64),
        "position": batch.column("position").to_numpy().astype(np.int64),
    }


def rank_batches(base, partition_by_row: np.ndarray, phase: tuple[int, ...], epoch: int, start_step: int,
                 rank: int, world_size: int, global_batch: int, seed: int, transform, device) -> Iterator[dict]:
    """This rank's batches of the epoch from global step ``start_step`` on, in global order.

    ``base`` is the materialised Ray Dataset (streamed through Ray Data every epoch) or, for
    small data, the same rows as one in-memory ``pyarrow.Table`` (:func:`joined_table`); both
    give the same batches."""
    if isinstance(base, pa.Table):
        return _local_rank_batches(base, partition_by_row, phase, epoch, start_step, rank, world_size,
                                   global_batch, seed, transform, device)
    from ray.data.expressions import col

    lo, hi = rank_slots(global_batch, rank, world_size)
    positions = epoch_positions(partition_by_row, phase, seed, epoch, global_batch)
    if hi == lo or (positions >= start_step * global_batch).sum() == 0:
        return iter(())
    ds = base.filter(expr=col("partition").is_in(list(phase)))  # the phase's data (Eqs. 15-17)
    ds = ds.map_batches(
        _select_rank_rows, fn_kwargs=dict(positions=positions, lo=lo, hi=hi, global_batch=global_batch, start_step=start_step),
        batch_format="pyarrow", batch_size=None,
    )
    ds = ds.sort("position")
    ds = ds.map_batches(_decode_batch, fn_kwargs=dict(transform=transform, seed=seed, epoch=epoch), batch_format="pyarrow", batch_size=32)
    # The dataset carries the driver's DataContext; order must survive every operator after sort.
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    return ds.iter_torch_batches(batch_size=hi - lo, device=device, prefetch_batches=2, drop_last=False)


def _local_rank_batches(table: pa.Table, partition_by_row: np.ndarray, phase: tuple[int, ...], epoch: int,
                        start_step: int, rank: int, world_size: int, global_batch: int, seed: int, transform,
                        device) -> Iterator[dict]:
    """:func:`rank_batches` from an in-memory table: the same row selection, order and decode,
    without a Ray Data pipeline per epoch. On a small dataset that pipeline's start, sort and
    teardown cost seconds per epoch while the steps themselves take a fraction of that."""
    lo, hi = rank_slots(global_batch, rank, world_size)
    if hi == lo:
        return
    # Rows outside the phase have position -1, so the selection also applies the phase filter.
    positions = epoch_positions(partition_by_row, phase, seed, epoch, global_batch)
    mine = _select_rank_rows(table, positions, lo, hi, global_batch, start_step).sort_by("position")
    for start in range(0, mine.num_rows, hi - lo):
        batch = _decode_batch(mine.slice(start, hi - lo), transform, seed, epoch)
        yield {name: torch.from_numpy(value).to(device) for name, value in batch.items()}


# --------------------------------------------------------------------------- the worker loop


def _optimizer(model, cfg: RunConfig, total_steps: int):
    from pacl_ray.core.pacl_model import head_parameters

    lr_backbone = cfg.train.lr_backbone or backbones.backbone_lr(cfg.model.backbone)
    groups = [
        {"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": lr_backbone, "name": "backbone"},
        {"params": head_parameters(model), "lr": cfg.train.lr_heads, "name": "heads"},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_factor(step, total_steps))
    return optimizer, scheduler


def _step_metrics(losses: dict, partition: torch.Tensor, optimizer, epoch: int, phase, global_step: int) -> dict:
    """One step's metrics (time and throughput are filled in once the step is done)."""
    n = max(int(partition.numel()), 1)
    row = {"global_step": global_step, "epoch": epoch, "phase": "".join(map(str, phase))}
    row.update({k: float(losses[k].detach()) for k in (*PHASE_COLUMNS, "total")})
    row.update({f"share_{k}": float((partition == k).sum()) / n for k in loss.PARTITION_CODES})
    row.update({f"lr_{g['name']}": float(g["lr"]) for g in optimizer.param_groups})
    row["batch_size"] = int(partition.numel())
    return row


def epoch_summary(step_rows: list[dict], epoch: int) -> dict:
    """Mean of the numeric step metrics of ``epoch``."""
    rows = [r for r in step_rows if r["epoch"] == epoch]
    out: dict[str, Any] = {"epoch": epoch, "phase": rows[0]["phase"] if rows else "", "steps": len(rows)}
    for key in (*PHASE_COLUMNS, "total", *(f"share_{k}" for k in loss.PARTITION_CODES), "samples_per_s", "data_wait_s"):
        out[key] = float(np.mean([r[key] for r in rows])) if rows else float("nan")
    if rows:
        out["global_step"] = rows[-1]["global_step"]
        out.update({k: v for k, v in rows[-1].items() if k.startswith("lr_")})
    return out


def _csv_text(rows: list[dict]) -> str:
    if not rows:
        return ""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_metric_logs(run_uri: str, step_rows: list[dict], epoch_rows: list[dict]) -> None:
    storage.write_text(storage.join(run_uri, "metrics_steps.csv"), _csv_text(step_rows))
    storage.write_text(storage.join(run_uri, "metrics_epochs.csv"), _csv_text(epoch_rows))


def _save_checkpoint(model, optimizer, scheduler, counters: dict, step_rows: list[dict]):
    from ray.train import Checkpoint

    directory = tempfile.mkdtemp(prefix="pacl-ckpt-")
    torch.save(
        {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
         "scheduler": scheduler.state_dict(), "counters": counters, "step_rows": step_rows},
        os.path.join(directory, STATE_FILE),
    )
    return Checkpoint.from_directory(directory), directory


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def load_state(checkpoint_dir: str) -> dict:
    """The training state saved in a (local) checkpoint directory: model, optimizer, scheduler,
    counters (epoch, step_in_epoch, global_step) and step_rows (the per-step metric log)."""
    return torch.load(os.path.join(checkpoint_dir, STATE_FILE), map_location="cpu", weights_only=False)


def _maybe_fail(fault: Optional[FaultInjection], global_step: int, rank: int) -> None:
    if fault and global_step == fault.step and rank == fault.rank and not storage.exists(fault.marker):
        storage.write_text(fault.marker, f"failed once at step {global_step}")
        raise RuntimeError(f"injected failure on rank {rank} before global step {global_step}")


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker function (see the module docstring)."""
    import ray.train
    import ray.train.torch

    from pacl_ray.core.pacl_model import build_model

    cfg: RunConfig = config["cfg"]
    partition_by_row: np.ndarray = config["partition_by_row"]
    phases, steps = config["phases"], config["steps_per_epoch"]
    total_steps, B = sum(steps), cfg.train.global_batch_size
    fault: Optional[FaultInjection] = config.get("fault")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    model, backbone = build_model(cfg, config["text_dim"])
    epoch, step_in_epoch, global_step, step_rows, state = 0, 0, 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = load_state(directory)
        model.load_state_dict(state["model"])
        epoch, step_in_epoch, global_step = (state["counters"][k] for k in ("epoch", "step_in_epoch", "global_step"))
        step_rows = state["step_rows"]
    model = ray.train.torch.prepare_model(model)  # to the device (+ DDP when W > 1)
    # The optimiser is built on the moved parameters so its restored state lands on their device.
    optimizer, scheduler = _optimizer(_unwrap(model), cfg, total_steps)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    amp_dtype = backbones.autocast_dtype(cfg.train.precision, device)
    data = config["dataset"]
    if isinstance(data, ray.ObjectRef):  # small data: the joined table, batched here
        data = ray.get(data)
    writer = _tensorboard(config["run_uri"]) if rank == 0 else None

    while epoch < len(phases):
        phase = phases[epoch]
        active = phase if cfg.train.objective == "pacl" else (loss.STRONG,)
        batches = rank_batches(data, partition_by_row, phase, epoch, step_in_epoch, rank, world, B,
                               cfg.seed, backbone.train_transform, device)
        tick = time.perf_counter()
        for batch in batches:
            if step_in_epoch >= steps[epoch]:
                break
            arrived = time.perf_counter()  # time spent waiting for data = arrived - tick
            _maybe_fail(fault, global_step, rank)
            torch.manual_seed(_seed_of(cfg.seed, global_step, rank))  # dropout / drop-path
            expected = batch["position"] // B
            if not bool((expected == step_in_epoch).all()):
                raise RuntimeError(f"rank {rank}: batch positions {batch['position'].tolist()} are not step {step_in_epoch}")
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                z_image, z_text = model(batch["image"], batch["text_feature"])
            partition = dist.all_gather_no_grad(batch["partition"])
            losses = loss.pacl_loss(
                dist.all_gather_with_grad(z_image.float()), dist.all_gather_with_grad(z_text.float()),
                partition, dist.all_gather_no_grad(batch["factual"]), dist.all_gather_no_grad(batch["emotional"]),
                cfg.train.temperature, active,
            )
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            row = _step_metrics(losses, partition, optimizer, epoch, phase, global_step)
            optimizer.step()
            scheduler.step()
            global_step += 1
            step_in_epoch += 1
            now = time.perf_counter()
            row.update(step_time_s=now - tick, data_wait_s=arrived - tick,
                       samples_per_s=row["batch_size"] / max(now - tick, 1e-9))
            tick = now
            step_rows.append(row)
            if writer:
                for key in (*PHASE_COLUMNS, "total", "samples_per_s", "lr_backbone", "lr_heads"):
                    writer.add_scalar(f"train/{key}", row[key], global_step)
            epoch_done = step_in_epoch == steps[epoch]
            every = cfg.train.checkpoint_every_steps
            wants_ckpt = epoch_done or (every > 0 and global_step % every == 0)
            if wants_ckpt or global_step % max(cfg.train.log_every_steps, 1) == 0:
                next_epoch, next_step = (epoch + 1, 0) if epoch_done else (epoch, step_in_epoch)
                counters = {"epoch": next_epoch, "step_in_epoch": next_step, "global_step": global_step}
                _report(row, counters, model, optimizer, scheduler, step_rows, wants_ckpt, rank, config["run_uri"])
        if step_in_epoch < steps[epoch]:
            raise RuntimeError(f"rank {rank}: epoch {epoch} ended after {step_in_epoch} of {steps[epoch]} steps")
        epoch, step_in_epoch = epoch + 1, 0
    if writer:
        writer.close()


def _report(row: dict, counters: dict, model, optimizer, scheduler, step_rows: list[dict], with_checkpoint: bool,
            rank: int, run_uri: str) -> None:
    """``ray.train.report`` on every rank (it is a barrier); rank 0 attaches the checkpoint."""
    import shutil

    import ray.train

    metrics = {**{k: v for k, v in row.items() if k != "phase"}, **counters}
    if not (with_checkpoint and rank == 0):
        ray.train.report(metrics)
        return
    epochs = sorted({r["epoch"] for r in step_rows})
    write_metric_logs(run_uri, step_rows, [epoch_summary(step_rows, e) for e in epochs])
    checkpoint, directory = _save_checkpoint(model, optimizer, scheduler, counters, step_rows)
    try:
        ray.train.report(metrics, checkpoint=checkpoint)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _tensorboard(run_uri: str):
    """A TensorBoard writer for local run directories (None for remote storage or no tensorboard)."""
    if storage.is_remote(run_uri):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(storage.join(run_uri, "tensorboard"))


# --------------------------------------------------------------------------- the driver


def train_key(cfg: RunConfig, ingest: StageOutput, partition: StageOutput, embed: StageOutput, cluster: StageOutput) -> str:
    return cache.content_key(STAGE, ingest, partition, embed, cluster, cfg.train, cfg.model, cfg.seed)


def _result_from_summary(uri: str, key: str, cached: bool) -> TrainResult:
    summary = cache.read_summary(uri)
    return TrainResult(
        uri=uri, key=key, cached=cached, backbone_checkpoint=summary["backbone_checkpoint"],
        heads_checkpoint=summary["heads_checkpoint"], export_info=summary["export_info"],
        checkpoint=summary["checkpoint"], history=summary["history"], final_metrics=summary["final_metrics"],
    )


def _scaling_config(cfg: RunConfig):
    from ray.train import ScalingConfig

    use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else runtime.cluster_gpus() > 0
    workers: Any = cfg.train.num_workers
    if cfg.train.max_workers:
        if cfg.train.max_workers < cfg.train.num_workers:
            raise ValueError(f"train.max_workers={cfg.train.max_workers} < train.num_workers={cfg.train.num_workers}")
        workers = (cfg.train.num_workers, cfg.train.max_workers)
    if cfg.train.global_batch_size < (cfg.train.max_workers or cfg.train.num_workers):
        raise ValueError(f"train.global_batch_size={cfg.train.global_batch_size} is smaller than the number of workers")
    resources = dict(cfg.train.resources_per_worker) or None
    return ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources), use_gpu


def _checkpoint_uri(run_uri: str, path: str) -> str:
    """A Ray checkpoint's path as a URI of the same kind as the run directory."""
    return f"{run_uri.split('://', 1)[0]}://{path.lstrip('/')}" if storage.is_remote(run_uri) else path


def run_train(cfg: RunConfig, ingest: StageOutput, partition: StageOutput, embed: StageOutput, cluster: StageOutput,
              *, fault: Optional[FaultInjection] = None, callbacks: Optional[list] = None) -> TrainResult:
    """Train (or resume, or take from the cache) and export; see the module docstring.

    ``callbacks`` go to Ray Train's ``RunConfig`` (e.g. Tune's ``TuneReportCallback`` so that a
    sweep's scheduler sees every report of a trial's training)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pacl_ray.formats.export import export_model
    from pacl_ray.core.pacl_model import build_model

    key = train_key(cfg, ingest, partition, embed, cluster)
    uri = cache.stage_uri(cfg.output_dir, STAGE, key)
    if cache.is_complete(uri):
        return _result_from_summary(uri, key, cached=True)
    runtime.init_ray(cfg.ray)
    save_config(cfg, uri)

    meta = load_training_table(ingest, partition, embed, cluster, cfg)
    partition_by_row = meta.column("partition").to_numpy()
    phases = epoch_phases(cfg)
    steps = steps_per_epoch(partition_by_row, phases, cfg.train.global_batch_size)
    empty = [e for e, n in enumerate(steps) if n == 0]
    if empty:
        rows = len(_phase_rows(partition_by_row, phases[empty[0]]))
        raise ValueError(
            f"train: epoch {empty[0]} (partitions {phases[empty[0]]}) has {rows} pairs, fewer than one "
            f"global batch of {cfg.train.global_batch_size}; lower train.global_batch_size"
        )
    scaling, use_gpu = _scaling_config(cfg)
    text_dim = int(meta.column("text_feature").type.list_size)
    # Small data: one table in the object store that each worker batches itself; a Ray Data
    # pipeline per epoch would cost more than the epoch's steps.
    if fits_in_memory(ingest, cfg.train.in_memory_max_mb):
        dataset = ray.put(joined_table(ingest, meta))
    else:
        dataset = build_dataset(ingest, meta)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg, "dataset": dataset, "partition_by_row": partition_by_row,
            "phases": phases, "steps_per_epoch": steps, "text_dim": text_dim, "run_uri": uri, "fault": fault,
        },
        scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RayRunConfig(
            name="ray_train", storage_path=uri,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks or []),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"train: Ray Train finished without a checkpoint ({uri})")
    with result.checkpoint.as_directory() as directory:
        state = load_state(directory)
    if state["counters"]["global_step"] != sum(steps):
        raise RuntimeError(f"train: final checkpoint at step {state['counters']['global_step']}, expected {sum(steps)}")

    step_rows = state["step_rows"]
    history = [epoch_summary(step_rows, e) for e in range(len(phases))]
    write_metric_logs(uri, step_rows, history)
    model, _ = build_model(cfg, text_dim)
    model.load_state_dict(state["model"])
    exported = export_model(model, cfg, storage.join(uri, "export"), text_dim)
    final = {**history[-1], "total_steps": sum(steps), "num_pairs": meta.num_rows}
    cache.mark_complete(uri, {
        "backbone_checkpoint": exported.backbone, "heads_checkpoint": exported.heads,
        "export_info": exported.info, "checkpoint": _checkpoint_uri(uri, result.checkpoint.path), "history": history,
        "final_metrics": final,
    })
    return _result_from_summary(uri, key, cached=False)
