"""Downstream task specs (paper 4.4, 4.5): what to evaluate on, and under which protocols.

Task spec
---------
``KIND:DATASET=ROOT[,option=value...]``

============  ===========================  ==========================================
KIND          DATASET                      metrics (Table 1 columns)
============  ===========================  ==========================================
single        fi, fi2, emotion6,           Acc-C, F1-C (C classes)
              unbiasedemo
imagefolder   any name (the display name)  Acc-C, F1-C; generic ImageFolder layout
hierarchical  webemo                       Acc-n, F1-n per level (n classes in it)
single        webemo2, webemo7, webemo25   Acc-n, F1-n of one WebEmo level trained alone (Table 2)
levels        webemo                       the three rows above in one evaluation (Table 2)
multilabel    emotic                       mAP, AUC (macro over categories)
vad           emotic, iaps                 MSE (x100), R2 (means over V, A, D)
============  ===========================  ==========================================

``ROOT`` is a local directory in the layout documented in :mod:`pacl_ray.evaluation.datasets`. Options:
``seed=N`` (split seed; default ``evaluate.split_seed``), ``limit=N`` (at most N images per split,
for quick runs), ``name=TEXT`` (the column label in the table). Examples::

    single:fi=/data/FI
    imagefolder:emo=/path/to/root,limit=200
    hierarchical:webemo=/data/WebEmo
    levels:webemo=/data/WebEmo
    multilabel:emotic=/data/Emotic
    vad:iaps=/data/IAPS,seed=3

``hierarchical:webemo`` predicts the three WebEmo levels together (Table 1); ``levels:webemo``
trains and tests each level on its own, as Table 2 does ("tested on each level separately",
paper 4.5.1): it expands (:func:`expand_tasks`) into ``single:webemo2``, ``single:webemo7`` and
``single:webemo25`` on the same ROOT and options, read from disk once (:func:`load_tasks`).

Protocols: ``linear``, ``finetune``, ``zeroshot`` (comma-separated for several; see
:mod:`pacl_ray.evaluation.evaluate`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pacl_ray.evaluation.datasets import (
    DISPLAY_NAMES, KINDS, READERS, WEBEMO_LEVELS, TaskData, load_dataset, read_webemo, webemo_levels,
)

PROTOCOLS = ("linear", "finetune", "zeroshot")
# (kind, dataset) of a spec that stands for several single-label tasks -> their dataset names
TASK_GROUPS = {("levels", "webemo"): tuple(WEBEMO_LEVELS)}
TASK_KINDS = KINDS + ("imagefolder", "levels")
TASK_OPTIONS = ("seed", "limit", "name")


class TaskSpecError(ValueError):
    """A ``--task`` spec (or protocol, or prompt template) does not parse; the message shows the grammar."""


@dataclass(frozen=True)
class TaskSpec:
    """A parsed ``KIND:DATASET=ROOT[,option=value...]``."""

    text: str
    kind: str  # single | hierarchical | multilabel | vad | imagefolder | levels (expanded before loading)
    dataset: str
    root: str
    seed: int
    limit: int = 0
    name: str = ""

    @property
    def task_kind(self) -> str:
        return "single" if self.kind == "imagefolder" else self.kind

    @property
    def display(self) -> str:
        return self.name or DISPLAY_NAMES.get(self.dataset, self.dataset)


def parse_task(text: str, default_seed: int = 0) -> TaskSpec:
    """Parse a task spec (grammar in the module docstring); errors say what is wrong and show it."""
    grammar = "expected KIND:DATASET=ROOT[,seed=N][,limit=N][,name=TEXT], e.g. single:fi=/data/FI"
    head, sep, root = text.partition("=")
    if not sep or ":" not in head or not root.strip():
        raise TaskSpecError(f"task {text!r}: {grammar}")
    kind, dataset = (part.strip().lower() for part in head.split(":", 1))
    if kind not in TASK_KINDS:
        raise TaskSpecError(f"task {text!r}: unknown kind {kind!r}; kinds: {', '.join(TASK_KINDS)}")
    if not dataset:
        raise TaskSpecError(f"task {text!r}: empty dataset name; {grammar}")
    if kind != "imagefolder" and (kind, dataset) not in READERS and (kind, dataset) not in TASK_GROUPS:
        known = sorted(d for k, d in list(READERS) + list(TASK_GROUPS) if k == kind)
        raise TaskSpecError(
            f"task {text!r}: no {kind} reader for {dataset!r}; {kind} datasets: {', '.join(known)} "
            f"(use imagefolder:{dataset}=ROOT for a generic ImageFolder layout)"
        )
    options: dict[str, str] = {}
    parts = root.split(",")
    while len(parts) > 1 and re.match(r"^\s*(\w+)\s*=", parts[-1]):
        key, _, value = parts.pop().partition("=")
        key = key.strip()
        if key not in TASK_OPTIONS:
            raise TaskSpecError(f"task {text!r}: unknown option {key!r}; options: {', '.join(TASK_OPTIONS)}")
        options[key] = value.strip()
    try:
        seed = int(options.get("seed", default_seed))
        limit = int(options.get("limit", 0))
    except ValueError as err:
        raise TaskSpecError(f"task {text!r}: seed and limit must be integers ({err})") from None
    if limit < 0:
        raise TaskSpecError(f"task {text!r}: limit must be >= 0")
    return TaskSpec(text=text, kind=kind, dataset=dataset, root=",".join(parts).strip(), seed=seed,
                    limit=limit, name=options.get("name", ""))


def parse_protocols(text: str) -> list[str]:
    """``"linear, zeroshot"`` -> ``["linear", "zeroshot"]``; TaskSpecError on an unknown protocol."""
    protocols = [p.strip().lower() for p in text.split(",") if p.strip()]
    bad = [p for p in protocols if p not in PROTOCOLS]
    if not protocols or bad:
        raise TaskSpecError(f"protocol {text!r}: expected one or more of {', '.join(PROTOCOLS)} (comma-separated)")
    return protocols


def expand_tasks(specs: list[TaskSpec]) -> list[TaskSpec]:
    """Specs with every group spec (``levels:webemo=ROOT...``) replaced by its single-label tasks
    (``single:webemo2=ROOT...``, ``single:webemo7=...``, ``single:webemo25=...``: same ROOT, seed,
    limit; a ``name=X`` becomes ``X-2``, ``X-7``, ``X-25``), in place and order."""
    out = []
    for spec in specs:
        members = TASK_GROUPS.get((spec.kind, spec.dataset))
        if members is None:
            out.append(spec)
            continue
        rest = spec.text.partition("=")[2]
        for dataset in members:
            suffix = dataset[len(spec.dataset):]
            out.append(TaskSpec(text=f"single:{dataset}={rest}", kind="single", dataset=dataset, root=spec.root,
                                seed=spec.seed, limit=spec.limit, name=f"{spec.name}-{suffix}" if spec.name else ""))
    return out


def load_task(spec: TaskSpec) -> TaskData:
    """The task's dataset with its splits (:func:`pacl_ray.evaluation.datasets.load_dataset`)."""
    if (spec.kind, spec.dataset) in TASK_GROUPS:
        raise TaskSpecError(f"task {spec.text!r} stands for several tasks; expand it with expand_tasks first")
    return load_dataset(spec.kind, spec.dataset, spec.root, seed=spec.seed, limit=spec.limit)


def load_tasks(specs: list[TaskSpec]) -> list[tuple[TaskSpec, TaskData]]:
    """(spec, data) for every task of ``specs`` after :func:`expand_tasks`. WebEmo levels on the same
    ROOT, seed and limit are read (and their images validated) once, then split by level."""
    webemo: dict[tuple, dict[str, TaskData]] = {}
    out = []
    for spec in expand_tasks(specs):
        if spec.kind == "single" and spec.dataset in WEBEMO_LEVELS:
            key = (spec.root, spec.seed, spec.limit)
            if key not in webemo:
                webemo[key] = webemo_levels(read_webemo(spec.root, seed=spec.seed, limit=spec.limit))
            out.append((spec, webemo[key][spec.dataset]))
        else:
            out.append((spec, load_task(spec)))
    return out
