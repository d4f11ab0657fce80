"""Stage 3's logs: per-step metrics, the epoch table, the metric CSVs, the run log and TensorBoard.

Files in the run directory: ``metrics_steps.csv`` (one row per global step), ``metrics_epochs.csv``
(one row per epoch, including epochs that took no step, with the reason and the partition counts;
SPEC "Choice (empty phases)"; ``val_acc`` for epochs that ran the validation probe), ``run.log`` (the plan, skipped epochs, a non-finite loss) and ``tensorboard/`` (event files, on
any storage: written locally and copied at each checkpoint).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from typing import Any, Optional

import numpy as np
import torch

from pacl_ray.core.partitions import PARTITION_CODES
from pacl_ray.formats import storage
from pacl_ray.stages.train_data import TrainingPlan, format_counts
from pacl_ray.stages.validation import VAL_METRIC

LOSS_TERMS = (*(f"L{k}" for k in PARTITION_CODES), "total")
RUN_LOG = "run.log"
TENSORBOARD_DIR = "tensorboard"
_MEANS = (*LOSS_TERMS, *(f"share_{k}" for k in PARTITION_CODES), "samples_per_s", "data_wait_s")


def phase_name(phase) -> str:
    return "".join(map(str, phase))


def step_metrics(losses: dict, partition: torch.Tensor, optimizer, epoch: int, phase, global_step: int) -> dict:
    """One step's metrics (time, throughput and the gradient scaler's outcome are filled in once
    the step is done)."""
    n = max(int(partition.numel()), 1)
    row: dict[str, Any] = {"global_step": global_step, "epoch": epoch, "phase": phase_name(phase)}
    row.update({k: float(losses[k].detach()) for k in LOSS_TERMS})
    row.update({f"share_{k}": float((partition == k).sum()) / n for k in PARTITION_CODES})
    row.update({f"lr_{g['name']}": float(g["lr"]) for g in optimizer.param_groups})
    row["batch_size"] = int(partition.numel())
    return row


def epoch_summary(step_rows: list[dict], epoch: int, plan: Optional[TrainingPlan] = None) -> dict:
    """Mean of the numeric step metrics of ``epoch``; with ``plan``, also the pairs in its phase,
    the partition counts, and why it took no step when it did not."""
    rows = [r for r in step_rows if r["epoch"] == epoch]
    phase = rows[0]["phase"] if rows else (phase_name(plan.phases[epoch]) if plan else "")
    out: dict[str, Any] = {"epoch": epoch, "phase": phase, "steps": len(rows)}
    for key in _MEANS:
        out[key] = float(np.mean([r[key] for r in rows])) if rows else float("nan")
    out["amp_skipped_steps"] = int(sum(r.get("amp_skipped", 0) for r in rows))
    if rows:
        out["global_step"] = rows[-1]["global_step"]
        out.update({k: v for k, v in rows[-1].items() if k.startswith("lr_")})
    validated = [r[VAL_METRIC] for r in rows if VAL_METRIC in r]
    if validated:  # the held-out probe of the epoch's end (pacl_ray.stages.validation)
        out[VAL_METRIC] = float(validated[-1])
    if plan is not None:
        out["pairs_in_phase"] = plan.pairs[epoch]
        out.update({f"count_{k}": plan.counts.get(k, 0) for k in PARTITION_CODES})
        out["note"] = plan.skip_note(epoch) if plan.steps[epoch] == 0 else ""
    return out


def epoch_table(step_rows: list[dict], plan: Optional[TrainingPlan], epochs: list[int]) -> list[dict]:
    return [epoch_summary(step_rows, e, plan) for e in epochs]


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


def plan_lines(plan: TrainingPlan) -> list[str]:
    """The run log's description of the plan: partition counts and every epoch that takes no step."""
    lines = [f"train: {plan.total_steps} global steps of {plan.global_batch} over {len(plan.phases)} epochs; "
             f"partition counts {format_counts(plan.counts)}"]
    lines += [f"train: epoch {e}: {plan.skip_note(e)}" for e in plan.skipped()]
    return lines


class RunLog:
    """``run.log`` in the run directory, printed and rewritten whole on every line (it stays short);
    a relaunch appends to what earlier launches wrote."""

    def __init__(self, run_uri: str):
        self.uri = storage.join(run_uri, RUN_LOG)
        self.lines: list[str] = storage.read_text(self.uri).splitlines() if storage.exists(self.uri) else []

    def write(self, *lines: str, echo: bool = True) -> None:
        """Append ``lines`` to ``run.log``; ``echo``: print them too."""
        for line in lines if echo else ():
            print(line)
        self.lines.extend(lines)
        storage.write_text(self.uri, "\n".join(self.lines) + "\n")


class TensorBoardLog:
    """TensorBoard event files for a run directory on any storage: written to a local directory
    (the run's own ``tensorboard/`` for a plain local path, a temporary one otherwise) and copied
    to ``<run>/tensorboard/`` through :mod:`pacl_ray.formats.storage` by :meth:`sync` (at each
    checkpoint) and :meth:`close`. Without the ``tensorboard`` package it writes nothing."""

    def __init__(self, run_uri: str):
        import tempfile

        self.uri = storage.join(run_uri, TENSORBOARD_DIR)
        self.local = "://" not in run_uri  # a plain path: write in place, nothing to copy
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer, self.directory = None, None
            return
        self.directory = self.uri if self.local else tempfile.mkdtemp(prefix="pacl-tb-")
        self.writer = SummaryWriter(self.directory)

    def add_scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def sync(self) -> None:
        """Flush, and copy every event file to the run directory (whole files: they stay small)."""
        if not self.writer:
            return
        self.writer.flush()
        if self.local:
            return
        for root, _, names in os.walk(self.directory):
            for name in names:
                path = os.path.join(root, name)
                rel = os.path.relpath(path, self.directory).replace(os.sep, "/")
                with open(path, "rb") as handle:
                    storage.write_bytes(storage.join(self.uri, rel), handle.read())

    def close(self) -> None:
        if not self.writer:
            return
        self.sync()
        self.writer.close()
        if not self.local:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.writer = None
