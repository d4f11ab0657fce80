"""The training stage's validation probe set, read from a labelled task (issue 20).

:func:`load_validation_set` turns ``validation.*`` into the
:class:`~pacl_ray.stages.validation.ValidationSet` that training's rank 0 probes at epoch ends
(``val_acc``, what a sweep's ASHA ranks on). It lives here, above the stages, because the task
grammar and the dataset readers are evaluation's (:mod:`pacl_ray.evaluation.tasks`,
:mod:`pacl_ray.evaluation.datasets`); the training stage only receives encoded images and labels.

The task is ``validation.task``, else the first of ``evaluate.tasks`` (on the embedded world, its
emotion set). Its ``train`` split is the kNN bank and its ``val`` split the queries, each capped at
``validation.max_images`` by the readers' seeded per-split choice (``limit``), so every trial of a
sweep probes the same images; the ``test`` split, on which trials are finally compared, is not used.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from pacl_ray.config import ConfigError, RunConfig
from pacl_ray.evaluation.datasets import DatasetError
from pacl_ray.evaluation.tasks import TaskSpecError, load_task, parse_task
from pacl_ray.formats.images import read_image_bytes
from pacl_ray.stages.validation import ValidationSet

PROBE_KINDS = ("single", "hierarchical")  # class labels a kNN vote predicts (imagefolder is single)


def validation_task(cfg: RunConfig) -> str:
    """The task spec the probe reads: ``validation.task``, else the first of ``evaluate.tasks``
    ("" when neither is set)."""
    return cfg.validation.task or (cfg.evaluate.tasks[0] if cfg.evaluate.tasks else "")


def load_validation_set(cfg: RunConfig) -> Optional[ValidationSet]:
    """The probe set of ``cfg``, or None when ``validation.every_epochs`` is 0 (off).

    Raises:
        ConfigError: no task to read (names validation.task and evaluate.tasks), a task spec that
            does not parse, a kind without class labels (multilabel, vad), or a dataset that cannot
            be read (the reader's message, naming the file).
    """
    v = cfg.validation
    if v.every_epochs == 0:
        return None
    text = validation_task(cfg)
    if not text:
        raise ConfigError(f"validation.every_epochs={v.every_epochs} needs a labelled task: set validation.task="
                          "KIND:DATASET=ROOT (grammar: pacl_ray.evaluation.tasks) or evaluate.tasks")
    key = "validation.task" if v.task else "evaluate.tasks[0] (validation.task is empty)"
    try:
        spec = parse_task(text, cfg.evaluate.split_seed)
        if spec.task_kind not in PROBE_KINDS:
            raise ConfigError(f"{key}={text!r}: a {spec.kind} task has no class labels for the kNN probe; "
                              "use a single, imagefolder or hierarchical task")
        data = load_task(dataclasses.replace(spec, limit=min(spec.limit or v.max_images, v.max_images)))
    except (TaskSpecError, DatasetError) as err:
        raise ConfigError(f"{key}={text!r}: {err}") from None
    bank, queries = data.splits["train"], data.splits["val"]
    return ValidationSet(
        name=spec.display,
        images=tuple(read_image_bytes(path) for path in [*bank.paths, *queries.paths]),
        targets=np.concatenate([bank.targets, queries.targets]).astype(np.int64),
        query=np.concatenate([np.zeros(len(bank), bool), np.ones(len(queries), bool)]),
        k=v.k, every_epochs=v.every_epochs, batch_size=v.batch_size,
    )
