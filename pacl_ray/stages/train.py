"""Stage 3 (paper 3.3): partition-adaptive contrastive training on Ray Train (``TorchTrainer``).

The data plan, the driver-side join and each worker's batches are in
:mod:`pacl_ray.stages.train_data`; checkpoints and the resume key in
:mod:`pacl_ray.stages.checkpoint`; metric logs in :mod:`pacl_ray.stages.train_metrics`.

Step. Per-rank projections -> one differentiable all-gather of both projections and one of the
labels (codes, pseudo-labels) -> :func:`pacl_ray.core.loss.pacl_loss` on the global batch ->
backward; DDP averages gradients, which with the gather's convention equals single-process
training on the global batch. The step reads nothing back to the host (issue #21): loss terms,
codes and positions stay on the device in a :class:`~pacl_ray.stages.train_loop.StepLog` and are
read, checked and logged every ``train.log_every_steps``, before every checkpoint and at each
epoch's end. ``train.compile`` (default: on CUDA) runs the step through ``torch.compile``;
``train.channels_last`` (default: conv nets on CUDA) makes the model and images NHWC; the
optimiser is fused AdamW on CUDA. Dropout randomness is seeded per (seed, step, rank), so a
resumed run replays exactly. fp16 autocast steps through
``torch.amp.GradScaler`` (a step whose gradients overflow is skipped and counted, ``amp_skipped``);
bf16 and fp32 need no scaler.

BatchNorm (SPEC "Training recipe"). ``train.sync_batchnorm`` (default: on when the run can have
more than one worker and the model has BatchNorm) converts BatchNorm to global-batch statistics
(:func:`pacl_ray.core.dist.convert_sync_batchnorm`: torch's on CUDA, ours on gloo/CPU) before
``prepare_model``, so 1 and W workers train the same; with it off, BatchNorm uses each rank's B/W rows.

Reporting (Ray Train V2). ``ray.train.report`` is a barrier and goes with every checkpoint
(``train.checkpoint_every_steps`` and each epoch end) only; step metrics go to TensorBoard every
step (event files copied to the run directory at each checkpoint) and to ``metrics_steps.csv``.
With a validation set (``validation.every_epochs``), rank 0 runs the held-out kNN probe at epoch
ends and every report carries its latest ``val_acc``, what a sweep's ASHA ranks on
(:mod:`pacl_ray.stages.validation`).

Non-finite loss (SPEC "Training recipe"). A step whose loss terms are not all finite stops the
run at the next readback (at most ``train.log_every_steps`` steps later, and always before a
checkpoint): every rank returns, rank 0 records the first non-finite step, its epoch and terms in
``nonfinite_loss.json``, and the driver raises :class:`NonFiniteLossError`; nothing is exported
or marked complete, and no checkpoint holds a step at or after the non-finite one. Returning
instead of raising keeps Ray Train from retrying a replay that would diverge at the same step
again.

Empty phases (SPEC "Choice (empty phases)"). An epoch whose phase holds fewer pairs than one
global batch takes no step; ``run.log`` and the epoch table say so with the partition counts. A
run in which no epoch can take a step raises
:class:`~pacl_ray.stages.train_data.NoTrainableEpochError`.

Where the loop runs. On Ray Train's workers (``train_loop_per_worker``), or, for a launch that
asks for it (``run_train(in_process=True)``: a sweep trial) and has exactly one CPU worker and no
callbacks, in the calling process (:mod:`pacl_ray.stages.train_launch`): the same loop and the same
result, two process starts fewer. Checkpoints then go to ``<run>/checkpoints/`` instead of
``<run>/ray_train/``; a relaunch resumes from the latest of either.

Elastic training. ``train.max_workers`` makes ``ScalingConfig(num_workers=(num_workers,
max_workers))``. The global batch stays ``train.global_batch_size`` at any world size W: each rank
takes B//W or B//W+1 rows of every global batch, so the loss, the learning-rate schedule and the
steps per epoch do not change when workers come or go; only the per-worker batch does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from pacl_ray.config import RunConfig, model_args, save_config
from pacl_ray.core import backbones, dist, loss
from pacl_ray.core.partitions import PARTITION_CODES
from pacl_ray.formats import storage
from pacl_ray.stages import cache, runtime
from pacl_ray.stages.cache import StageOutput
from pacl_ray.stages.checkpoint import STAGE, load_state, train_key, unwrap, write_state
from pacl_ray.stages.train_data import (  # noqa: F401 (NoTrainableEpochError: the stage's errors are its own)
    EMOTIONAL, FACTUAL, PARTITION, NoTrainableEpochError, TrainingPlan, feed_order, fits_in_memory, joined_table,
    load_training_table, make_plan, rank_batches, seed_of, with_codes,
)
from pacl_ray.stages.train_feed import FeedOrder, chunk_layout, feed_chunk_rows, feed_shards, feed_uri, write_feed
from pacl_ray.stages.train_step import ImageNormalizer, NonFiniteLossError, build_optimizer, grad_scaler, optimizer_step
from pacl_ray.stages.train_loop import (
    NonFinite, StepLog, gather_features, gather_labels, resolve_channels_last, resolve_compile, startup_line,
    startup_times, step_model,
)
from pacl_ray.stages.train_launch import (
    IN_PROCESS_DIR, InProcessWorker, RayTrainWorker, as_checkpoint, checkpoint_directory, latest_checkpoint,
    run_with_retries, runs_in_process, torch_threads, worker_threads, write_counters,
)
from pacl_ray.stages.train_metrics import (
    LOSS_TERMS, RunLog, TensorBoardLog, epoch_table, plan_lines, write_metric_logs,
)
from pacl_ray.stages.validation import VAL_METRIC, ValidationSet, latest_val, make_validator

NONFINITE_FILE = "nonfinite_loss.json"


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


# --------------------------------------------------------------------------- the worker loop


def _maybe_fail(fault: Optional[FaultInjection], global_step: int, rank: int) -> None:
    if fault and global_step == fault.step and rank == fault.rank and not storage.exists(fault.marker):
        storage.write_text(fault.marker, f"failed once at step {global_step}")
        raise RuntimeError(f"injected failure on rank {rank} before global step {global_step}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker function (see the module docstring)."""
    loop_started_at = time.time()  # wall clock: compared with the driver's start (start_to_first_step_s)
    train_loop(config, RayTrainWorker(), loop_started_at)


def train_loop(config: dict, worker: "RayTrainWorker | InProcessWorker", loop_started_at: float) -> None:
    """The worker loop on a Ray Train worker or in the calling process (:mod:`train_launch`)."""
    import ray

    from pacl_ray.core.pacl_model import build_model

    cfg: RunConfig = config["cfg"]
    order: FeedOrder = config["order"]
    plan: TrainingPlan = config["plan"]
    phases, steps, B = plan.phases, plan.steps, plan.global_batch
    fault: Optional[FaultInjection] = config.get("fault")
    rank, world, device = worker.rank, worker.world, worker.device
    amp_dtype = backbones.autocast_dtype(cfg.train.precision, device)

    model, backbone = build_model(config["text_dim"], **model_args(cfg))
    epoch, step_in_epoch, global_step, step_rows = 0, 0, 0, []
    state = worker.restored_state()
    # The run's latest checkpoint of the other kind (an earlier launch in or out of process) when
    # it is further on than what Ray Train restores (train_launch).
    resume = config.get("resume_from")
    if resume and (state is None or resume[0] > state["counters"]["global_step"]):
        with checkpoint_directory(resume[1]) as directory:
            state = load_state(directory)
    if state:
        model.load_state_dict(state["model"])
        epoch, step_in_epoch, global_step = (state["counters"][k] for k in ("epoch", "step_in_epoch", "global_step"))
        step_rows = state["step_rows"]
    if sync_batchnorm(cfg, model):  # global-batch statistics (SPEC "Training recipe"); same state_dict keys
        model = dist.convert_sync_batchnorm(model, device)
    channels_last = resolve_channels_last(cfg.train.channels_last, model, device)
    if channels_last:  # before DDP wraps it, so DDP's buckets see the NHWC parameters
        model = model.to(memory_format=torch.channels_last)
    model = worker.prepare_model(model)  # to the device (+ DDP when W > 1)
    forward = step_model(model, resolve_compile(cfg.train.compile, device))
    normalize = ImageNormalizer.for_backbone(backbone, device, channels_last)  # uint8 batches -> model input
    # The optimiser is built on the moved parameters so its restored state lands on their device.
    optimizer, scheduler = build_optimizer(unwrap(model), cfg, plan.total_steps)
    scaler = grad_scaler(amp_dtype, device)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
    data = config["dataset"]
    if isinstance(data, ray.ObjectRef):  # small data: the joined table, batched here
        data = ray.get(data)
    writer = TensorBoardLog(config["run_uri"]) if rank == 0 else None
    validation = config.get("validation")  # the held-out probe (stages.validation): rank 0 runs it
    validator = make_validator(ray.get(validation), backbone.eval_transform, device, cfg.train.precision) \
        if rank == 0 and validation is not None else None
    node_id = ray.get_runtime_context().get_node_id()

    log_every = max(cfg.train.log_every_steps, 1)
    step_log = StepLog(B, rank)
    diverged: Optional[NonFinite] = None
    first_step_at: Optional[float] = None
    while epoch < len(phases):
        phase = phases[epoch]
        if steps[epoch] == 0:  # an empty phase: no step (SPEC "Choice (empty phases)"; logged by the driver)
            epoch, step_in_epoch = epoch + 1, 0
            continue
        batches = rank_batches(data, order, phase, epoch, step_in_epoch, rank, world, backbone.train_transform, device,
                               object_store_mb=cfg.train.feed_object_store_mb)
        tick = time.perf_counter()
        for batch in batches:
            if step_in_epoch >= steps[epoch]:
                break
            arrived = time.perf_counter()  # time spent waiting for data = arrived - tick
            _maybe_fail(fault, global_step, rank)
            torch.manual_seed(seed_of(cfg.seed, global_step, rank))  # dropout / drop-path
            # No host sync from here to the flush (module docstring, "Step").
            images = normalize(batch["image"])
            with backbones.autocast(device, cfg.train.precision):
                z_image, z_text = forward(images, batch["text_feature"])
            partition, factual, emotional = gather_labels(batch[PARTITION], batch[FACTUAL], batch[EMOTIONAL])
            z_image, z_text = gather_features(z_image.float(), z_text.float())
            losses = loss.pacl_loss(z_image, z_text, partition, factual, emotional, cfg.train.temperature, phase)
            amp_skipped = int(optimizer_step(model, optimizer, scaler, losses["total"], cfg.train.grad_clip))
            step_log.add(losses, partition, batch["position"], optimizer, global_step=global_step, epoch=epoch,
                         phase=phase, step_in_epoch=step_in_epoch, amp_skipped=amp_skipped,
                         grad_scale=float(scaler.get_scale()) if scaler.is_enabled() else 1.0)  # fp16 only: a read
            scheduler.step()
            global_step += 1
            step_in_epoch += 1
            epoch_done = step_in_epoch == steps[epoch]
            every = cfg.train.checkpoint_every_steps
            wants_ckpt = epoch_done or (every > 0 and global_step % every == 0)
            flush = wants_ckpt or global_step % log_every == 0
            if flush or first_step_at is None:
                _synchronize(device)  # the window's last step ends when the device is done: its time is exact
            now = time.perf_counter()
            step_log.annotate_last(step_time_s=now - tick, data_wait_s=arrived - tick)
            tick = now
            if first_step_at is None:
                first_step_at = time.time()
            if not flush:
                continue
            rows, diverged = step_log.flush(device)
            step_rows.extend(rows)
            if writer:  # every step to TensorBoard; synced to the run directory with each checkpoint
                for row in rows:
                    writer.add_scalars({f"train/{k}": row[k] for k in (*LOSS_TERMS, "samples_per_s", "lr_backbone",
                                                                       "lr_heads", "amp_skipped")}, row["global_step"] + 1)
            if rank == 0 and rows:
                row = rows[-1]
                runtime.echo(f"train: step {global_step} epoch {epoch} " + " ".join(f"{k}={row[k]:.4g}" for k in LOSS_TERMS))
            if diverged:
                if rank == 0:
                    record = {"global_step": diverged.global_step, "epoch": diverged.epoch, "phase": diverged.phase,
                              "losses": diverged.losses}
                    storage.write_text(storage.join(config["run_uri"], NONFINITE_FILE), json.dumps(record))
                break  # every rank stops here; the driver raises NonFiniteLossError
            next_epoch, next_step = (epoch + 1, 0) if epoch_done else (epoch, step_in_epoch)
            counters = {"epoch": next_epoch, "step_in_epoch": next_step, "global_step": global_step}
            timing = {"first_step_at": first_step_at, "loop_started_at": loop_started_at}
            # Ray Train V2: every report is a barrier and carries a checkpoint; step metrics go to
            # TensorBoard and metrics_steps.csv instead of metric-only reports.
            if wants_ckpt:
                if validator and epoch_done and validator.due(epoch, steps):
                    step_rows[-1][VAL_METRIC] = validator.accuracy(unwrap(model).backbone)
                    writer.add_scalars({"val/acc": step_rows[-1][VAL_METRIC]}, global_step)
                val = {VAL_METRIC: latest_val(step_rows)} if validation is not None else {}  # Tune: in every result
                _report(worker, {**step_rows[-1], **val, **timing, "world_rank": rank, "world_size": world,
                                 "node_id": node_id},
                        counters, model, optimizer, scheduler, scaler, step_rows, config["run_uri"], plan, writer)
        if diverged:
            break
        if step_in_epoch < steps[epoch]:
            raise RuntimeError(f"rank {rank}: epoch {epoch} ended after {step_in_epoch} of {steps[epoch]} steps")
        epoch, step_in_epoch = epoch + 1, 0
    if writer:
        writer.close()  # and a last sync


def _report(worker, row: dict, counters: dict, model, optimizer, scheduler, scaler, step_rows: list[dict],
            run_uri: str, plan: TrainingPlan, writer: Optional[TensorBoardLog]) -> None:
    """Report on every rank (Ray Train's report is a barrier); rank 0 attaches the checkpoint and
    writes the metric logs and TensorBoard files to the run directory first."""
    metrics = {**{k: v for k, v in row.items() if k != "phase"}, **counters}
    if worker.rank != 0:
        worker.report(metrics)
        return
    epochs = sorted({r["epoch"] for r in step_rows})
    write_metric_logs(run_uri, step_rows, epoch_table(step_rows, plan, epochs))
    if writer:
        writer.sync()
    directory = tempfile.mkdtemp(prefix="pacl-ckpt-")
    try:
        write_state(directory, model, optimizer, scheduler, scaler, counters, step_rows)
        write_counters(directory, counters)  # a relaunch finds the latest checkpoint by it (train_launch)
        worker.report(metrics, checkpoint_dir=directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------- the driver


def _epoch_ranges(epochs: list[int]) -> str:
    """``[0, 1, 2, 3, 7]`` -> ``"epochs 0-3, 7"`` (``"epoch 5"`` for one)."""
    runs: list[list[int]] = []
    for e in epochs:
        if runs and e == runs[-1][-1] + 1:
            runs[-1].append(e)
        else:
            runs.append([e])
    text = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)
    return f"epoch{'s' if len(epochs) > 1 else ''} {text}"


def startup_summary(times: dict[str, float]) -> str:
    """:func:`startup_line` on the console, in under 100 characters."""
    return (f"train: first step at {times['start_to_first_step_s']:.1f} s (setup {times['driver_setup_s']:.1f} s, "
            f"worker start {times['worker_start_s']:.1f} s, then {times['worker_to_first_step_s']:.1f} s)")


def plan_summary(plan: TrainingPlan) -> list[str]:
    """The plan on the console, once per run, in lines under 100 characters: steps, epochs and the
    scored partition counts; then, if any, the epochs that take no step, grouped by phase (one line,
    or one line per phase when several; SPEC "Choice (empty phases)"). ``run.log`` has the long form
    (:func:`plan_lines`)."""
    counts = " / ".join(str(plan.counts.get(code, 0)) for code in PARTITION_CODES)
    lines = [f"train: {plan.total_steps} global steps of {plan.global_batch} over {len(plan.phases)} epochs; "
             f"partitions 1-4: {counts} pairs"]
    groups: dict[tuple, list[int]] = {}
    for epoch in plan.skipped():
        groups.setdefault((plan.phases[epoch], plan.pairs[epoch]), []).append(epoch)
    if groups:
        parts = [f"{_epoch_ranges(epochs)} (phase {''.join(map(str, phase)) or 'empty'}: {pairs} pairs)"
                 for (phase, pairs), epochs in groups.items()]
        line = f"train: no step in {'; '.join(parts)}: under one global batch of {plan.global_batch}"
        if len(line) > 100:  # several phases: one line each
            line = "\n".join([f"train: no step in these epochs, under one global batch of {plan.global_batch}:",
                               *(f"  {part}" for part in parts)])
        lines.append(line)
    return lines


def _summary_path(uri: str, path: str, local: bool = False) -> str:
    """A path stored in ``_SUCCESS`` (relative to the run directory, so no storage credentials are
    written) as a URI of the run directory's kind; ``local``: a plain path for a ``file://`` run
    (Ray checkpoints are read with local file APIs). Absolute paths from older runs pass through."""
    if "://" in path or os.path.isabs(path):
        return path
    joined = storage.join(uri, path)
    return storage.resolve(joined)[1] if local and not storage.is_remote(uri) else joined


def _result_from_summary(uri: str, key: str, cached: bool) -> TrainResult:
    summary = cache.read_summary(uri)
    return TrainResult(
        uri=uri, key=key, cached=cached,
        backbone_checkpoint=_summary_path(uri, summary["backbone_checkpoint"]),
        heads_checkpoint=_summary_path(uri, summary["heads_checkpoint"]),
        export_info=_summary_path(uri, summary["export_info"]), checkpoint=_summary_path(uri, summary["checkpoint"], local=True),
        history=summary["history"], final_metrics=summary["final_metrics"],
    )


def _relative(uri: str, target: str) -> str:
    """``target`` (a URI or an in-filesystem path below the run directory) relative to ``uri``."""
    base = storage.resolve(uri)[1]
    path = storage.resolve(target)[1] if "://" in target else target
    return posixpath.relpath(path, base)


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


def _ray_storage(uri: str) -> dict:
    """Ray Train's storage arguments for the run directory: remote URIs go as (filesystem, path)
    so credentials in the URI never reach Ray's own state files and logs."""
    if not storage.is_remote(uri):
        return {"storage_path": uri}
    fs, path = storage.resolve(uri)
    return {"storage_path": path, "storage_filesystem": fs}


def sync_batchnorm(cfg: RunConfig, model: torch.nn.Module) -> bool:
    """``train.sync_batchnorm``, resolved: null = on when the run can have more than one worker and
    the model has BatchNorm (then 1 and W workers train the same; SPEC "Training recipe")."""
    if cfg.train.sync_batchnorm is not None:
        return cfg.train.sync_batchnorm
    return max(cfg.train.num_workers, cfg.train.max_workers or 0) > 1 and dist.has_batchnorm(model)


def _nonfinite_error(uri: str, cfg: RunConfig, last_step: Optional[int]) -> Optional[NonFiniteLossError]:
    record_uri = storage.join(uri, NONFINITE_FILE)
    if not storage.exists(record_uri):
        return None
    record = json.loads(storage.read_text(record_uri))
    terms = ", ".join(f"{k}={v}" for k, v in record["losses"].items())
    saved = f"the last checkpoint is at global step {last_step}" if last_step is not None else "no checkpoint was saved"
    return NonFiniteLossError(
        f"train: non-finite loss at global step {record['global_step']} (epoch {record['epoch']}, phase "
        f"{record['phase']}): {terms}; train.temperature={cfg.train.temperature}, train.precision="
        f"{cfg.train.precision}. Nothing was exported or marked complete; {saved}."
    )


def run_train(cfg: RunConfig, ingest: StageOutput, partition: StageOutput, embed: StageOutput, cluster: StageOutput,
              *, fault: Optional[FaultInjection] = None, callbacks: Optional[list] = None,
              started_at: Optional[float] = None, validation: Optional[ValidationSet] = None,
              in_process: bool = False) -> TrainResult:
    """Train (or resume, or take from the cache) and export; see the module docstring.

    ``callbacks`` go to Ray Train's ``RunConfig`` (e.g. Tune's ``TuneReportCallback`` so that a
    sweep's scheduler sees every report of a trial's training). ``started_at``: the wall-clock
    time (``time.time()``) the caller counts from, e.g. a sweep trial's start; default: this
    call. The final metrics then hold ``start_to_first_step_s`` (seconds from it to the end of
    this launch's first training step) and ``run.log`` its parts (:func:`startup_line`).
    ``validation``: the held-out probe reported as ``val_acc`` with checkpoints
    (:mod:`pacl_ray.stages.validation`); None = none.
    ``in_process``: run the worker loop in this process when the launch has exactly one CPU
    worker and no callbacks (:mod:`pacl_ray.stages.train_launch`; a sweep trial asks for it);
    any other launch goes to Ray Train as without it.

    Raises:
        NonFiniteLossError: a step's loss was not finite (nothing exported, no ``_SUCCESS``).
        NoTrainableEpochError: no epoch's phase holds one global batch of pairs.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    from pacl_ray.core.pacl_model import build_model
    from pacl_ray.stages.export_backbone import export_model

    started_at = time.time() if started_at is None else started_at
    key = train_key(cfg, ingest, partition, embed, cluster)
    uri = cache.stage_uri(cfg.output_dir, STAGE, key)
    if cache.is_complete(uri):
        return _result_from_summary(uri, key, cached=True)
    runtime.init_ray(cfg.ray)
    # The config records the launch's settings; the output dir without any credentials in it.
    save_config(dataclasses.replace(cfg, output_dir=storage.redact(cfg.output_dir)), uri)
    log = RunLog(uri)

    meta = load_training_table(ingest, partition, embed, cluster, cfg.train.k)
    # The pairs' storage chunks (id column only): the epoch order is built on them (train_feed).
    chunk_rows = feed_chunk_rows(meta.num_rows, cfg.train.feed_chunk_rows,
                                 feed_shards(cfg.train.global_batch_size, cfg.train.feed_shards))
    layout = chunk_layout(ingest.path("pairs"), meta.column("id").to_numpy(zero_copy_only=False).astype(str), chunk_rows)
    try:
        codes, plan = make_plan(cfg, meta.column(PARTITION).to_numpy(), layout)
    except NoTrainableEpochError as err:
        log.write(str(err))
        raise
    meta = with_codes(meta, codes)
    log.write(*plan_lines(plan), echo=False)  # the full plan in run.log; the console gets it short
    for line in plan_summary(plan):
        print(line)
    scaling, use_gpu = _scaling_config(cfg)
    local = in_process and runs_in_process(cfg.train.num_workers, cfg.train.max_workers, use_gpu, callbacks)
    text_dim = int(meta.column("text_feature").type.list_size)
    # Small data: one table in the object store that each worker batches itself (in process: the
    # table itself); a Ray Data pipeline per epoch would cost more than the epoch's steps. Otherwise
    # each rank streams its chunks of the feed files (written once per ingest/embed/cluster/K,
    # shared across trials).
    if fits_in_memory(ingest, cfg.train.in_memory_max_mb):
        table = joined_table(ingest, meta)
        dataset = table if local else ray.put(table)
    else:
        dataset = write_feed(feed_uri(cfg.output_dir, ingest, embed, cluster, cfg.train.k, chunk_rows),
                             ingest.path("pairs"), meta.drop_columns([PARTITION]), chunk_rows)
    order = feed_order(codes, plan.global_batch, cfg.seed, cfg.train.feed_shards, layout)

    record_fs, record_path = storage.resolve(storage.join(uri, NONFINITE_FILE))
    if storage.exists(storage.join(uri, NONFINITE_FILE)):  # from an earlier launch; this one records its own
        record_fs.delete_file(record_path)
    loop_config = {"cfg": cfg, "dataset": dataset, "order": order, "plan": plan, "text_dim": text_dim, "run_uri": uri,
                   "fault": fault, "validation": ray.put(validation) if validation is not None else None}
    earlier = latest_checkpoint(uri)  # an earlier launch of this run (interrupted, crashed, preempted)
    if earlier is not None:
        log.write(f"train: resuming from the checkpoint at global step {earlier[0]} of {plan.total_steps} "
                  f"(an earlier launch of this run)")
    fit_at = time.time()
    if local:
        def launch():  # each try resumes from the run's latest checkpoint of either kind
            worker = InProcessWorker(uri)
            with torch_threads(worker_threads(cfg.train.resources_per_worker)):
                train_loop({**loop_config, "resume_from": latest_checkpoint(uri)}, worker, time.time())
            return worker

        worker = run_with_retries(launch, cfg.train.max_failures, log.write)
        metrics, checkpoint = worker.metrics, as_checkpoint(worker.checkpoint)
    else:
        trainer = TorchTrainer(
            train_loop_per_worker,
            # Ray Train restores its own checkpoints; the latest in-process one is passed in case
            # an earlier launch of this run went further in process.
            train_loop_config={**loop_config, "resume_from": latest_checkpoint(uri, kinds=(IN_PROCESS_DIR,))},
            scaling_config=scaling,
            run_config=RayRunConfig(
                name="ray_train", **_ray_storage(uri),
                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                callbacks=list(callbacks or []),
                # Ray Train's INFO echoes (every report's TrainingReport repr, resource requests):
                # the stage prints its own plan and epoch lines (issue 20).
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        result = trainer.fit()
        metrics, checkpoint = result.metrics or {}, result.checkpoint
    if checkpoint is None:  # this launch had no step left to take: the run's latest checkpoint is its last
        checkpoint = as_checkpoint((latest_checkpoint(uri) or (None, None))[1])
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_state(directory)
    diverged = _nonfinite_error(uri, cfg, state["counters"]["global_step"] if state else None)
    if diverged:
        log.write(str(diverged))
        raise diverged
    if state is None:
        raise RuntimeError(f"train: training finished without a checkpoint ({storage.redact(uri)})")
    if state["counters"]["global_step"] != plan.total_steps:
        raise RuntimeError(f"train: final checkpoint at step {state['counters']['global_step']}, expected {plan.total_steps}")

    step_rows = state["step_rows"]
    history = epoch_table(step_rows, plan, list(range(len(plan.phases))))
    write_metric_logs(uri, step_rows, history)
    model, _ = build_model(text_dim, **model_args(cfg))
    model.load_state_dict(state["model"])
    exported = export_model(model, cfg, storage.join(uri, "export"), text_dim)
    final = {**history[-1], "total_steps": plan.total_steps, "num_pairs": meta.num_rows,
             "skipped_epochs": len(plan.skipped()), "amp_skipped_steps": sum(h["amp_skipped_steps"] for h in history)}
    startup = startup_times(started_at, fit_at, metrics)
    if startup:
        final.update(startup)
        log.write(startup_line(startup), echo=False)
        print(startup_summary(startup))
    cache.mark_complete(uri, {
        "backbone_checkpoint": _relative(uri, exported.backbone), "heads_checkpoint": _relative(uri, exported.heads),
        "export_info": _relative(uri, exported.info), "checkpoint": _relative(uri, checkpoint.path),
        "history": history, "final_metrics": final,
    })
    return _result_from_summary(uri, key, cached=False)
