"""The training stage's held-out validation probe (issue 20): ``val_acc``, reported with checkpoints.

What a sweep's ASHA scheduler ranks trials on has to be comparable across trials. The training
loss is not (tau changes its scale; sigma and K change which L_k enter it), so training reports a
held-out signal instead: a cosine k-nearest-neighbour vote (:func:`pacl_ray.core.metrics.knn_accuracy`)
on the current backbone's pooled features, in eval mode, of a small labelled set that every trial
sees identically:

* the *bank* is a labelled task's ``train`` split and the *queries* its ``val`` split (at most
  ``validation.max_images`` each, a seeded choice); the task's ``test`` split, on which trials are
  finally compared, is never read. The task is ``validation.task``, else the first of
  ``evaluate.tasks`` (the embedded world's emotion set). It is read and checked above this layer
  (:func:`pacl_ray.evaluation.validation_set.load_validation_set`) and reaches the workers as a
  :class:`ValidationSet` of encoded images and labels;
* rank 0 runs it at the end of every ``validation.every_epochs``-th epoch and of the last epoch
  that takes a step,
  before that epoch's checkpoint, while the other ranks wait in ``ray.train.report`` (a barrier).
  Images are decoded with the backbone's eval transform in each pass (nothing large is kept).

``val_acc`` (percent) goes into the step row of the epoch's last step (so checkpoints, the epoch
table, ``metrics_steps.csv`` / ``metrics_epochs.csv`` and a resumed run keep it), to TensorBoard as
``val/acc``, and into every report: each report carries the latest value (NaN before the first
probe of a run), because Tune requires a scheduler's metric in every result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from pacl_ray.core import backbones, metrics
from pacl_ray.formats.images import decode_rgb

VAL_METRIC = "val_acc"  # the reported name; what sweeps' ASHA ranks on (pacl_ray.sweeps.spaces)
VAL_MODE = "max"


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value
class ValidationSet:
    """A labelled probe set: encoded images, labels, which rows are queries, and the probe settings.

    ``targets`` int64 [N] (single-label) or [N, L] (one class per level); ``query`` bool [N]: True
    for a query (the task's val split), False for the bank (its train split)."""

    name: str
    images: tuple  # encoded image bytes [N]
    targets: np.ndarray
    query: np.ndarray
    k: int = 10
    every_epochs: int = 1
    batch_size: int = 128

    def __post_init__(self):
        n = len(self.images)
        if len(self.targets) != n or len(self.query) != n:
            raise ValueError(f"validation set {self.name}: {n} images, {len(self.targets)} targets, "
                             f"{len(self.query)} query flags")
        if not self.query.any() or self.query.all():
            raise ValueError(f"validation set {self.name}: needs both bank and query images "
                             f"({int(self.query.sum())} queries of {n})")

    def due(self, epoch: int, steps: Sequence[int]) -> bool:
        """Whether the probe runs at the end of ``epoch`` (0-based), given each epoch's steps: every
        ``every_epochs``-th epoch and the last epoch that takes a step (a run ends validated)."""
        last = max((e for e, n in enumerate(steps) if n), default=-1)
        return (epoch + 1) % self.every_epochs == 0 or epoch == last


def backbone_features(backbone: torch.nn.Module, images: Sequence[bytes], transform: Callable, device: torch.device,
                      batch_size: int, precision: str = "fp32") -> np.ndarray:
    """Pooled features float32 [N, D] of encoded ``images`` through ``transform`` (the backbone's
    eval transform), with the backbone in eval mode (its train/eval mode is restored after); no
    gradient, autocast as training (``precision``; CPU always fp32)."""
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        with torch.no_grad(), backbones.autocast(device, precision):
            for start in range(0, len(images), batch_size):
                batch = torch.stack([transform(decode_rgb(data)) for data in images[start:start + batch_size]])
                out.append(backbone(batch.to(device)).float().cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(out).numpy()


def probe_accuracy(data: ValidationSet, features: np.ndarray) -> float:
    """The kNN vote's accuracy in percent: queries of ``data`` against its bank (``features`` [N, D])."""
    q = data.query
    return 100.0 * metrics.knn_accuracy(features[~q], data.targets[~q], features[q], data.targets[q], data.k)


class Validator:
    """Runs the probe of ``data`` on a backbone (rank 0 of the training loop)."""

    def __init__(self, data: ValidationSet, transform: Callable, device: torch.device, precision: str = "fp32"):
        self.data, self.transform, self.device, self.precision = data, transform, device, precision

    def due(self, epoch: int, steps: Sequence[int]) -> bool:
        return self.data.due(epoch, steps)

    def accuracy(self, backbone: torch.nn.Module) -> float:
        """``val_acc`` (percent) of ``backbone`` now."""
        features = backbone_features(backbone, self.data.images, self.transform, self.device, self.data.batch_size,
                                     self.precision)
        return probe_accuracy(self.data, features)


def latest_val(step_rows: Sequence[dict]) -> float:
    """The last ``val_acc`` recorded in ``step_rows``; NaN when none was (validation off or not yet run)."""
    for row in reversed(step_rows):
        value = row.get(VAL_METRIC)
        if value is not None and not math.isnan(value):
            return float(value)
    return float("nan")


def make_validator(data: Optional[ValidationSet], transform: Callable, device: torch.device,
                   precision: str) -> Optional[Validator]:
    return Validator(data, transform, device, precision) if data is not None else None
