"""The training step's device-side parts (issue #21): no host sync inside a step.

A CUDA step that reads a value back to the host (``.item()``, ``float(t)``, ``bool(t)``) waits for
every kernel queued before it, and the GPU then idles while Python queues the next ones. So the
worker loop keeps each step's loss terms, gathered partition codes and batch positions on the
device in a :class:`StepLog`, and reads them back in one copy at the log cadence
(``train.log_every_steps``), before every checkpoint and at the end of each epoch
(:meth:`StepLog.flush`). The flush then

* checks that each batch held the positions of its step (the data plan's invariant), raising
  ``RuntimeError`` naming the rank, the step and the positions;
* checks that every loss term is finite (SPEC "Training recipe"): the first non-finite step is
  found from the per-step values, so the run stops naming exactly that step (:class:`NonFinite`);
  the steps queued after it touched only the in-memory model, which is never checkpointed or
  exported once a step was non-finite;
* returns the per-step metric rows (:func:`pacl_ray.stages.train_metrics.step_metrics`), with the
  same values a per-step readback gave.

Also here: the start-up time of a launch (:func:`startup_times`, issue #21's trial
start-to-first-step), labels gathered once per batch (:func:`gather_labels`) and features once
(:func:`gather_features`), and the speed settings of the step model (:func:`step_model`):
``torch.compile`` (``train.compile``) and channels_last (``train.channels_last``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import nn

from pacl_ray.core import dist
from pacl_ray.stages.train_metrics import LOSS_TERMS, step_metrics

_LABELS = 3  # partition code, factual and emotional pseudo-label


# --------------------------------------------------------------------------- step model


def resolve_compile(setting: Optional[bool], device: torch.device) -> bool:
    """``train.compile``: null means on for CUDA, off elsewhere (on CPU, compiling costs more
    than a short run's steps gain, and the tests' bitwise checks run the eager kernels)."""
    return bool(setting) if setting is not None else torch.device(device).type == "cuda"


def is_conv_net(model: nn.Module) -> bool:
    """More than one 2-D convolution: a conv net (a ViT's patch embedding alone does not count)."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def resolve_channels_last(setting: Optional[bool], model: nn.Module, device: torch.device) -> bool:
    """``train.channels_last``: null means on for conv nets on CUDA (cuDNN's tensor-core
    convolutions run NHWC; NCHW inputs cost a transpose per convolution)."""
    if setting is not None:
        return bool(setting)
    return torch.device(device).type == "cuda" and is_conv_net(model)


def step_model(model: nn.Module, compile: bool, backend: str = "inductor"):
    """The callable the step runs: ``model`` itself, or ``torch.compile(model)``.

    The compiled wrapper shares ``model``'s parameters; checkpoints and the optimiser keep using
    ``model`` (so state-dict keys carry no ``_orig_mod.`` prefix). Compiling the DDP-wrapped model
    lets Dynamo split graphs at DDP's bucket boundaries, keeping gradient all-reduce overlapped
    with the backward pass. Shapes are static (every step of a rank has the same batch size)."""
    return torch.compile(model, backend=backend, dynamic=False) if compile else model


# --------------------------------------------------------------------------- gathers


def gather_labels(partition: torch.Tensor, factual: torch.Tensor, emotional: torch.Tensor):
    """(partition, factual, emotional) of the global batch [N] int64 each, in one all-gather of
    this rank's [n, 3] block (one collective and one size exchange per step instead of three)."""
    block = torch.stack([partition, factual, emotional], dim=1)
    return dist.all_gather_no_grad(block).unbind(dim=1)


def gather_features(z_image: torch.Tensor, z_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both projections [n, D] of every rank -> [N, D] each, in one differentiable all-gather of
    the [n, 2D] concatenation (the gradient convention of ``all_gather_with_grad`` is elementwise,
    so splitting after the gather gives the same gradients as two gathers)."""
    width = z_image.shape[1]
    gathered = dist.all_gather_with_grad(torch.cat([z_image, z_text], dim=1))
    return gathered[:, :width], gathered[:, width:]


# --------------------------------------------------------------------------- deferred readback


@dataclass
class _Step:
    values: torch.Tensor  # float64 [5 + N + n]: loss terms, gathered partition codes, local positions
    n_global: int  # N
    global_step: int
    epoch: int
    phase: tuple[int, ...]
    step_in_epoch: int
    lrs: list[dict]  # the parameter groups' names and learning rates when the step ran
    extra: dict  # host-side values copied into the row (timings, the gradient scaler's outcome)


@dataclass
class NonFinite:
    """The first step whose loss terms were not all finite."""

    global_step: int
    epoch: int
    phase: str
    losses: dict[str, float]


@dataclass
class StepLog:
    """Per-step values kept on the device until :meth:`flush` (see the module docstring).

    Args:
        global_batch: B, the rows of every global step (positions of step s are [s*B, (s+1)*B)).
        rank: this worker's rank (for error messages).
    """

    global_batch: int
    rank: int = 0
    pending: list[_Step] = field(default_factory=list)

    def add(self, losses: dict[str, torch.Tensor], partition: torch.Tensor, position: torch.Tensor, optimizer, *,
            global_step: int, epoch: int, phase: tuple[int, ...], step_in_epoch: int, **extra: Any) -> None:
        """Queue one step (no host sync).

        Args:
            losses: the scalar terms of ``pacl_loss`` (float32 on the device).
            partition: [N] int64 gathered codes of the global batch.
            position: [n] int64 this rank's batch positions in the epoch's order.
            optimizer: its parameter groups' learning rates are read now (Python floats), as
                they were when the step ran.
            extra: host-side values copied into the step's row.
        """
        terms = torch.stack([losses[k].detach() for k in LOSS_TERMS]).to(torch.float64)
        values = torch.cat([terms, partition.detach().to(terms.device, torch.float64),
                            position.detach().to(terms.device, torch.float64)])
        lrs = [{"name": g["name"], "lr": g["lr"]} for g in optimizer.param_groups]
        self.pending.append(_Step(values, int(partition.numel()), global_step, epoch, tuple(phase), step_in_epoch,
                                  lrs, extra))

    def annotate_last(self, step_time_s: float, data_wait_s: float) -> None:
        """Record the last queued step's wall times (host side) and its samples/s."""
        last = self.pending[-1]
        last.extra.update(step_time_s=step_time_s, data_wait_s=data_wait_s,
                          samples_per_s=last.n_global / max(step_time_s, 1e-9))

    def __len__(self) -> int:
        return len(self.pending)

    def flush(self, device: torch.device) -> tuple[list[dict], Optional[NonFinite]]:
        """Read the queued steps back (one device-to-host copy) and check them.

        Returns:
            (rows of the steps before the first non-finite one, in step order; that step or None).
            Every rank returns the same non-finite step (the finite flags are combined across
            ranks, one collective per flush).
        Raises:
            RuntimeError: a batch did not hold the positions of its step (names rank, step, positions).
        """
        steps, self.pending = self.pending, []
        if not steps:
            return [], None
        values = torch.cat([s.values for s in steps]).cpu()  # the flush's one host sync
        n_terms, parsed, offset = len(LOSS_TERMS), [], 0
        for s in steps:
            chunk = values[offset:offset + s.values.numel()]
            offset += s.values.numel()
            parsed.append((chunk[:n_terms].to(torch.float32), chunk[n_terms:n_terms + s.n_global].to(torch.int64),
                           chunk[n_terms + s.n_global:].to(torch.int64)))
        finite = torch.tensor([float(torch.isfinite(terms).all()) for terms, _, _ in parsed])
        # Every rank computes the same global-batch loss; combining the flags keeps the ranks
        # together even if a kernel rounded differently on one.
        finite = (dist.all_reduce_mean(finite.to(device)).cpu() == 1.0).tolist()
        rows: list[dict] = []
        for s, (terms, partition, position), ok in zip(steps, parsed, finite):
            if not bool((position // self.global_batch == s.step_in_epoch).all()):
                raise RuntimeError(f"rank {self.rank}: batch positions {position.tolist()} are not "
                                   f"step {s.step_in_epoch}")
            losses = dict(zip(LOSS_TERMS, terms))  # float32 scalars, as the step computed them
            if not ok:
                return rows, NonFinite(s.global_step, s.epoch, "".join(map(str, s.phase)),
                                       {k: float(v) for k, v in losses.items()})
            row = step_metrics(losses, partition, SimpleNamespace(param_groups=s.lrs), s.epoch, s.phase, s.global_step)
            row.update(s.extra)
            rows.append(row)
        return rows, None


# --------------------------------------------------------------------------- start-up time


def startup_times(started_at: float, fit_at: float, metrics: dict) -> dict[str, float]:
    """Seconds from ``started_at`` to the first training step and its parts, from the driver's
    wall-clock marks and the worker's (``loop_started_at``, ``first_step_at`` in its reports);
    {} when the workers reported no step (a cached or empty run).

    ``start_to_first_step_s`` = ``driver_setup_s`` (stage resolution, reading and joining the
    tables, up to the launch) + ``worker_start_s`` (Ray Train's controller and worker processes,
    the process group; about 0 for a launch in the calling process) + ``worker_to_first_step_s``
    (imports, model build, first batch and the first step itself, compile included)."""
    first, loop = metrics.get("first_step_at"), metrics.get("loop_started_at")
    if first is None or loop is None:
        return {}
    return {"start_to_first_step_s": first - started_at, "driver_setup_s": fit_at - started_at,
            "worker_start_s": loop - fit_at, "worker_to_first_step_s": first - loop}


def startup_line(times: dict[str, float]) -> str:
    return (f"train: first step {times['start_to_first_step_s']:.1f} s after start (driver setup "
            f"{times['driver_setup_s']:.1f} s, Ray Train worker start {times['worker_start_s']:.1f} s, worker to "
            f"first step {times['worker_to_first_step_s']:.1f} s)")
