"""Stage 3's checkpoints and resume key.

A checkpoint (every epoch and every ``train.checkpoint_every_steps``) is one ``state.pt`` holding
model, optimiser, scheduler and (fp16) gradient-scaler state, the counters (epoch, step in epoch,
global step: the data position) and the per-step metric log. It holds tensors and plain Python
values only, so it is read with ``torch.load(weights_only=True)``: a planted pickle that would run
code is refused instead of executed.

The run directory is keyed on what changes the result (:func:`train_key`). Operational settings
(:data:`OPERATIONAL_SETTINGS`) are left out, so relaunching a crashed run with, say,
``--set train.max_failures=5`` resumes from its checkpoint instead of starting over elsewhere.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import tempfile
from typing import Any, Optional

import torch

from pacl_ray.config import RunConfig
from pacl_ray.stages import cache
from pacl_ray.stages.cache import StageOutput

STAGE = "train"
STATE_FILE = "state.pt"

# TrainConfig fields that can change between launches of one run without changing its result:
# failures allowed, logging and checkpoint frequency, worker count (the global batch, its order
# and the data each step sees do not depend on it; see pacl_ray.stages.train_data), Ray resources
# per worker, the in-memory/streamed switch and the streamed feed's object-store budget (the same
# batches either way), and the step's kernel choices (compile, memory format: the same math,
# rounded differently, as with a worker count).
OPERATIONAL_SETTINGS = (
    "max_failures", "num_workers", "max_workers", "resources_per_worker", "log_every_steps",
    "checkpoint_every_steps", "in_memory_max_mb", "feed_object_store_mb", "compile", "channels_last",
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read as a training state."""


def result_settings(train_cfg: Any) -> dict:
    """The TrainConfig fields that change the result (every field but :data:`OPERATIONAL_SETTINGS`)."""
    settings = dataclasses.asdict(train_cfg)
    for name in OPERATIONAL_SETTINGS:
        settings.pop(name, None)
    return settings


def train_key(cfg: RunConfig, ingest: StageOutput, partition: StageOutput, embed: StageOutput, cluster: StageOutput) -> str:
    """The run directory's content key: the upstream stages' keys, the result-changing training
    settings, the model and the seed."""
    return cache.content_key(STAGE, ingest, partition, embed, cluster, result_settings(cfg.train), cfg.model, cfg.seed)


def unwrap(model):
    """The module inside DDP (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def write_state(directory: str, model, optimizer, scheduler, scaler: Optional[torch.amp.GradScaler],
                counters: dict, step_rows: list[dict]) -> str:
    """Write ``state.pt`` into a local directory; returns its path."""
    state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "counters": counters, "step_rows": step_rows}
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    path = os.path.join(directory, STATE_FILE)
    torch.save(state, path)
    return path


def save_checkpoint(model, optimizer, scheduler, scaler, counters: dict, step_rows: list[dict]):
    """(a Ray Train ``Checkpoint`` of the state, its temporary local directory to remove after reporting)."""
    from ray.train import Checkpoint

    directory = tempfile.mkdtemp(prefix="pacl-ckpt-")
    write_state(directory, model, optimizer, scheduler, scaler, counters, step_rows)
    return Checkpoint.from_directory(directory), directory


def load_state(checkpoint_dir: str) -> dict:
    """The training state saved in a (local) checkpoint directory: model, optimizer, scheduler,
    optional scaler, counters (epoch, step_in_epoch, global_step) and step_rows.

    Raises:
        CheckpointError: the file holds anything but tensors and plain values (e.g. a pickle that
            would run code), naming the file.
    """
    path = os.path.join(checkpoint_dir, STATE_FILE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refused to load: it holds more than tensors and plain values (torch.load(weights_only=True): "
            f"{reason}). Training checkpoints never do; delete the file if you did not write it."
        ) from None
