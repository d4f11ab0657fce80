"""Downstream evaluation (paper 4.4, 4.5): linear evaluation, fine-tuning and zero-shot.

    pacl-ray evaluate --backbone runs/export/ --task single:fi=/data/FI --task vad:iaps=/data/IAPS
    pacl-ray evaluate --backbone resnet50 --task hierarchical:webemo=/data/WebEmo --protocol finetune

Task spec
---------
``KIND:DATASET=ROOT[,option=value...]``

============  ===========================  ==========================================
KIND          DATASET                      metrics (Table 1 columns)
============  ===========================  ==========================================
single        fi, emotion6, unbiasedemo    Acc-C, F1-C (C classes)
imagefolder   any name (the display name)  Acc-C, F1-C; generic ImageFolder layout
hierarchical  webemo                       Acc-n, F1-n per level (n classes in it)
multilabel    emotic                       mAP, AUC (macro over categories)
vad           emotic, iaps                 MSE (x100), R2 (means over V, A, D)
============  ===========================  ==========================================

``ROOT`` is a local directory in the layout documented in :mod:`pacl_ray.evaluation.datasets`. Options:
``seed=N`` (split seed; default ``evaluate.split_seed``), ``limit=N`` (at most N images per split,
for quick runs), ``name=TEXT`` (the column label in the table). Examples::

    single:fi=/data/FI
    imagefolder:emo=/path/to/root,limit=200
    hierarchical:webemo=/data/WebEmo
    multilabel:emotic=/data/Emotic
    vad:iaps=/data/IAPS,seed=3

Backbones
---------
``--backbone`` (or :func:`evaluate_backbone`'s ``backbone`` / ``checkpoint``) is one of

* a PACL export directory (holds ``export.json``): its ``backbone.safetensors`` is evaluated, and
  zero-shot is possible; with ``evaluate.compare_initial`` the export's initial weights are evaluated
  too, so the table has the "X" and "X + PACL" rows of Table 1;
* a local checkpoint file (safetensors or torch) for the architecture ``model.backbone``;
* a timm name or ``open_clip:<arch>`` (weights from ``model.backbone_pretrained``).

PACL export (written by :mod:`pacl_ray.formats.export`): ``export.json`` with keys ``backbone``,
``text_encoder``, ``text_pooling``, ``text_max_length``, ``embed_dim`` (optionally
``backbone_pretrained``, the initial weights' tag); ``backbone.safetensors`` loadable with
``models.create_backbone(backbone, "true", checkpoint=...)``; ``heads.safetensors`` with
``image_proj.weight`` [E, Dv] and ``text_proj.weight`` [E, Dt] (bias-free linear layers; the names
``image_head.weight`` / ``text_head.weight`` that :mod:`pacl_ray.formats.export` writes are accepted too).

Protocols (``evaluate.protocol``; comma-separated for several)
-----------------------------------------------------------------
* ``linear`` -- frozen backbone. Pooled features of every split are extracted once with Ray Data
  (a callable-class actor pool, the backbone's eval transform) and cached by content key under
  ``{output_dir}/evaluate/features/``. A linear head (one per level for hierarchical tasks, trained
  together) is trained on standardised features for ``linear_epochs`` (40) with lr ``linear_lr``
  (1e-2). **Choice**: the paper gives only the head's lr and says the other settings follow its
  section 4.2, so the optimiser is AdamW (weight decay ``evaluate.weight_decay``, default 0) with
  per-step cosine decay and batch size ``evaluate.batch_size`` (64). Losses: cross-entropy (summed
  over levels), binary cross-entropy (multi-label), MSE (VAD; the head starts at the train mean).
* ``finetune`` -- the whole backbone is trained with the head (AdamW, cosine): backbone lr
  ``evaluate.finetune_lr`` or :func:`pacl_ray.core.backbones.finetune_lr` (1e-4 ResNet-50, 1e-5 others),
  head lr ``linear_lr``, ``finetune_epochs`` epochs, the backbone's train transform. One process
  (a Ray task holding one GPU when the cluster has GPUs); not distributed over several workers.
* ``zeroshot`` -- a PACL export only: class prompts -> frozen text encoder -> text head; image ->
  backbone -> image head; cosine argmax (scores for multi-label). One row per prompt template
  (``evaluate.prompts``; ``{}`` or ``[C]`` marks the class name) plus an ``ensemble`` row (the mean
  of the templates' normalised text embeddings), as in Table 3. Not defined for VAD tasks.

Model selection: the epoch with the best validation score (mean accuracy over levels, mAP, or lowest
MSE); its test metrics are reported. Units as in Table 1 (see :mod:`pacl_ray.core.metrics`).

Outputs: ``{output_dir}/evaluate/<content key>/`` holds ``config.yaml``, ``rows.json``,
``results.md`` and ``results.csv`` (Table 1 layout: rows = model and protocol, columns = task
metrics), ``quarantine/<task>.json`` and ``_SUCCESS``. Each (backbone, task, protocol) result is
also cached under ``{output_dir}/evaluate/rows/`` so adding a task re-runs only that task.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from pacl_ray.stages import cache
from pacl_ray.core import metrics
from pacl_ray.formats import storage
from pacl_ray.config import RunConfig, save_config, to_dict
from pacl_ray.evaluation.datasets import DISPLAY_NAMES, KINDS, READERS, DatasetError, Split, TaskData, load_dataset

PROTOCOLS = ("linear", "finetune", "zeroshot")
EVALUATE_VERSION = 1  # bump when a change alters the results a given input produces (row cache key)
TASK_KINDS = KINDS + ("imagefolder",)
TASK_OPTIONS = ("seed", "limit", "name")
EXPORT_META = "export.json"
EXPORT_BACKBONE = "backbone.safetensors"
EXPORT_HEADS = "heads.safetensors"
EXPORT_KEYS = ("backbone", "text_encoder", "text_pooling", "text_max_length", "embed_dim")
# (image, text) projection weights [E, D]; pacl_ray.formats.export writes the *_head names.
HEAD_KEYS = (("image_proj.weight", "image_head.weight"), ("text_proj.weight", "text_head.weight"))
METRIC_COLUMN = re.compile(r"^(Acc|F1)-\S+$|^(mAP|AUC|MSE|R2)$")
PROTOCOL_TITLES = {"linear": "Linear Evaluation", "finetune": "Fine-tuning", "zeroshot": "Zero-shot"}


class TaskSpecError(ValueError):
    """A ``--task`` spec does not parse; the message shows the grammar."""


class ExportError(ValueError):
    """A PACL export directory is incomplete or inconsistent; the message names the file and key."""


# --------------------------------------------------------------------------- task specs


@dataclass(frozen=True)
class TaskSpec:
    """A parsed ``KIND:DATASET=ROOT[,option=value...]``."""

    text: str
    kind: str  # single | hierarchical | multilabel | vad | imagefolder
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
    if kind != "imagefolder" and (kind, dataset) not in READERS:
        known = sorted(d for k, d in READERS if k == kind)
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
    protocols = [p.strip().lower() for p in text.split(",") if p.strip()]
    bad = [p for p in protocols if p not in PROTOCOLS]
    if not protocols or bad:
        raise TaskSpecError(f"protocol {text!r}: expected one or more of {', '.join(PROTOCOLS)} (comma-separated)")
    return protocols


def load_task(spec: TaskSpec) -> TaskData:
    return load_dataset(spec.kind, spec.dataset, spec.root, seed=spec.seed, limit=spec.limit)


# --------------------------------------------------------------------------- backbones and exports


@dataclass(frozen=True)
class BackboneRef:
    """What to evaluate: a backbone architecture, its weights, and its row label."""

    name: str  # timm name or open_clip:<arch>
    pretrained: str
    checkpoint: str = ""  # local weights file; wins over pretrained
    label: str = ""
    export_dir: str = ""  # a PACL export directory (heads + text encoder for zero-shot)
    input_size: int = 0  # transform resolution; 0 = the architecture's own

    def identity(self) -> list:
        """What the features depend on (the label does not)."""
        if self.checkpoint:
            return [self.name, cache.file_fingerprint(self.checkpoint), self.input_size]
        return [self.name, self.pretrained, self.input_size]


def read_export_meta(directory: str) -> dict:
    """``export.json`` of a PACL export, checked for the keys zero-shot needs."""
    path = os.path.join(directory, EXPORT_META)
    try:
        meta = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise ExportError(f"{path}: not found; a PACL export directory holds {EXPORT_META}, "
                          f"{EXPORT_BACKBONE} and {EXPORT_HEADS}") from None
    except json.JSONDecodeError as err:
        raise ExportError(f"{path}: not valid JSON ({err})") from None
    missing = [k for k in EXPORT_KEYS if k not in meta]
    if missing:
        raise ExportError(f"{path}: missing key {missing[0]!r} (required: {', '.join(EXPORT_KEYS)})")
    return meta


def _is_export_dir(path: str) -> bool:
    return bool(path) and os.path.isfile(os.path.join(os.path.expanduser(path), EXPORT_META))


def _export_ref(directory: str, label: str) -> BackboneRef:
    directory = os.path.abspath(os.path.expanduser(directory))
    meta = read_export_meta(directory)
    weights = os.path.join(directory, EXPORT_BACKBONE)
    if not os.path.isfile(weights):
        raise ExportError(f"{weights}: not found (the PACL export's backbone weights)")
    return BackboneRef(name=meta["backbone"], pretrained="true", checkpoint=weights,
                       label=label or f"{meta['backbone']} + PACL", export_dir=directory,
                       input_size=int(meta.get("image_size") or 0))


def resolve_backbone(cfg: RunConfig, backbone: str | None = None, checkpoint: str = "", label: str = "") -> BackboneRef:
    """Turn a ``--backbone`` value (export dir, checkpoint file, or model name) into a BackboneRef."""
    if not backbone:
        backbone, checkpoint = cfg.model.backbone, checkpoint or cfg.model.backbone_checkpoint
    if _is_export_dir(backbone):
        return _export_ref(backbone, label)
    if _is_export_dir(checkpoint):
        return _export_ref(checkpoint, label)
    local = os.path.expanduser(backbone)
    if os.path.isfile(local):  # a bare weights file for the configured architecture
        name = cfg.model.backbone
        return BackboneRef(name=name, pretrained="true", checkpoint=os.path.abspath(local),
                           label=label or f"{name} ({os.path.basename(local)})",
                           input_size=cfg.model.backbone_input_size)
    if os.path.isdir(local):
        raise ExportError(f"{local}: a directory without {EXPORT_META} is neither a PACL export nor a checkpoint")
    if checkpoint:
        checkpoint = os.path.abspath(os.path.expanduser(checkpoint))
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"checkpoint {checkpoint} not found")
        parent = os.path.dirname(checkpoint)
        if _is_export_dir(parent) and os.path.basename(checkpoint) == EXPORT_BACKBONE:
            return dataclasses.replace(_export_ref(parent, label), name=backbone)
        return BackboneRef(name=backbone, pretrained="true", checkpoint=checkpoint,
                           label=label or f"{backbone} ({os.path.basename(checkpoint)})",
                           input_size=cfg.model.backbone_input_size)
    return BackboneRef(name=backbone, pretrained=cfg.model.backbone_pretrained, label=label or backbone,
                       input_size=cfg.model.backbone_input_size)


def initial_ref(cfg: RunConfig, export: BackboneRef) -> BackboneRef:
    """The initial weights a PACL export started from (``backbone_pretrained`` in export.json, else
    ``model.backbone_pretrained``)."""
    meta = read_export_meta(export.export_dir)
    pretrained = str(meta.get("backbone_pretrained", cfg.model.backbone_pretrained))
    checkpoint = meta.get("backbone_checkpoint") or ""
    if checkpoint and not os.path.isfile(os.path.expanduser(checkpoint)):
        raise ExportError(f"{export.export_dir}: the initial checkpoint {checkpoint} recorded in "
                          f"{EXPORT_META} is missing")
    return BackboneRef(name=export.name, pretrained=pretrained, checkpoint=os.path.expanduser(checkpoint),
                       label=export.name, input_size=export.input_size)


@dataclass
class PaclExport:
    """The zero-shot parts of a PACL export: projection heads and the frozen text encoder's name."""

    directory: str
    meta: dict
    image_proj: torch.Tensor  # [E, Dv]
    text_proj: torch.Tensor  # [E, Dt]


def load_export(directory: str) -> PaclExport:
    """Load ``export.json`` and ``heads.safetensors``, checking keys and shapes."""
    from safetensors.torch import load_file

    meta = read_export_meta(directory)
    path = os.path.join(directory, EXPORT_HEADS)
    if not os.path.isfile(path):
        raise ExportError(f"{path}: not found (the PACL export's projection heads)")
    heads = load_file(path)
    found = []
    for names in HEAD_KEYS:
        key = next((k for k in names if k in heads), None)
        if key is None:
            raise ExportError(f"{path}: missing tensor {names[0]!r} or {names[1]!r} (have {sorted(heads)})")
        if heads[key].ndim != 2 or heads[key].shape[0] != int(meta["embed_dim"]):
            raise ExportError(f"{path}: {key} has shape {tuple(heads[key].shape)}, expected [embed_dim="
                              f"{meta['embed_dim']}, D]")
        found.append(heads[key].float())
    return PaclExport(directory, meta, found[0], found[1])


# --------------------------------------------------------------------------- feature extraction (Ray Data)


def load_rgb(path: str):
    """An upright 8-bit RGB PIL image from a local path or pyarrow URI (the shared decoder,
    :func:`pacl_ray.formats.images.load_rgb`: EXIF orientation, every mode scaled to RGB)."""
    from pacl_ray.formats.images import load_rgb as decode_file

    return decode_file(path)


class FeatureExtractor:
    """Ray Data UDF: the backbone loads once per actor; batches of paths -> pooled features."""

    def __init__(self, name: str, pretrained: str, checkpoint: str, precision: str, input_size: int = 0):
        from pacl_ray.core.backbones import autocast_dtype, create_backbone, default_device

        backbone = create_backbone(name, pretrained, checkpoint, input_size)
        self.device = default_device()
        self.model = backbone.model.eval().requires_grad_(False).to(self.device)
        self.transform = backbone.eval_transform
        self.dtype = autocast_dtype(precision, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.stack([self.transform(load_rgb(str(p))) for p in batch["path"]]).to(self.device)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            features = self.model(images)
        return {"row": batch["row"], "feature": features.float().cpu().numpy()}


def _features_uri(cfg: RunConfig, ref: BackboneRef, fingerprint: str) -> str:
    key = cache.content_key("evaluate-features", ref.identity(), fingerprint)
    return storage.join(cfg.output_dir, "evaluate", "features", key)


def _save_array(uri: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    storage.write_bytes(uri, buffer.getvalue())


def _load_array(uri: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)


def _features_in_process(items: list[dict], extractor_kwargs: dict, batch_size: int) -> Iterator[dict]:
    """FeatureExtractor over ``items`` (row, path) in a loop in this process: batches (row, feature)."""
    extractor = FeatureExtractor(**extractor_kwargs)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        rows = np.array([item["row"] for item in chunk])
        paths = np.array([item["path"] for item in chunk], dtype=object)
        yield extractor({"row": rows, "path": paths})


def _features_on_ray_data(items: list[dict], extractor_kwargs: dict, cfg: RunConfig) -> Iterator[dict]:
    """FeatureExtractor over ``items`` in a Ray Data actor pool: batches (row, feature)."""
    import ray

    from pacl_ray.stages.runtime import cluster_gpus

    num_gpus = cfg.evaluate.num_gpus if cluster_gpus() > 0 else 0
    # Blocks of a few batches: from_items' default of 200 blocks makes ten-image blocks on a
    # small set, each with its own scheduling overhead (2000 images of 32 px: 16.2 s -> 14.6 s).
    blocks = max(1, math.ceil(len(items) / (4 * cfg.evaluate.batch_size)))
    features = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        FeatureExtractor, fn_constructor_kwargs=extractor_kwargs,
        batch_size=cfg.evaluate.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=max(1, cfg.evaluate.concurrency)), num_gpus=num_gpus,
    )
    yield from features.iter_batches(batch_size=None, batch_format="numpy")


def extract_features(cfg: RunConfig, ref: BackboneRef, data: TaskData, splits: Sequence[str]) -> dict[str, np.ndarray]:
    """Pooled backbone features float32 [N, D] per split, from the cache or one extraction pass
    over every split that is missing."""
    return extract_features_many(cfg, ref, [(data, splits)])[0]


def extract_features_many(
    cfg: RunConfig, ref: BackboneRef, requests: Sequence[tuple[TaskData, Sequence[str]]],
) -> list[dict[str, np.ndarray]]:
    """Features for several (task, splits) requests; everything not cached is extracted in ONE pass
    (in this process for few images, else Ray Data; see ``ray.in_process_max_rows``), so the
    backbone loads once however many tasks there are."""
    from pacl_ray.stages.runtime import init_ray, runs_in_process

    out: list[dict[str, np.ndarray]] = [{} for _ in requests]
    todo: dict[str, tuple[int, str, Split, str]] = {}  # cache uri -> (request, split, data, task)
    for index, (data, splits) in enumerate(requests):
        for split in splits:
            uri = _features_uri(cfg, ref, data.fingerprints[split])
            if cache.is_complete(uri):
                out[index][split] = _load_array(storage.join(uri, "features.npy"))
            else:
                todo.setdefault(uri, (index, split, data.splits[split], data.name))
    if todo:
        init_ray(cfg.ray)
        items, offsets = [], {}
        for uri, (_, _, split_data, _) in todo.items():
            start = len(items)
            offsets[uri] = (start, start + len(split_data))
            items.extend([{"row": start + i, "path": p} for i, p in enumerate(split_data.paths)])
        extractor_kwargs = dict(name=ref.name, pretrained=ref.pretrained, checkpoint=ref.checkpoint,
                                precision=cfg.evaluate.precision, input_size=ref.input_size)
        if runs_in_process(len(items), cfg.ray):
            batches = _features_in_process(items, extractor_kwargs, cfg.evaluate.batch_size)
        else:
            batches = _features_on_ray_data(items, extractor_kwargs, cfg)
        rows, chunks = [], []
        for batch in batches:
            rows.append(batch["row"])
            chunks.append(batch["feature"])
        row_ids = np.concatenate(rows)
        if not np.array_equal(np.sort(row_ids), np.arange(len(items))):
            raise RuntimeError(f"feature extraction returned {len(row_ids)} rows for {len(items)} images")
        stacked = np.concatenate(chunks)[np.argsort(row_ids)].astype(np.float32)
        for uri, (_, split, _, task) in todo.items():
            start, stop = offsets[uri]
            _save_array(storage.join(uri, "features.npy"), stacked[start:stop])
            cache.mark_complete(uri, {"backbone": ref.name, "checkpoint": ref.checkpoint, "task": task,
                                      "split": split, "rows": stop - start, "dim": int(stacked.shape[1])})
        for index, (data, splits) in enumerate(requests):
            for split in splits:
                if split not in out[index]:
                    start, stop = offsets[_features_uri(cfg, ref, data.fingerprints[split])]
                    out[index][split] = stacked[start:stop]
    return out


# --------------------------------------------------------------------------- heads, losses, predictions


def task_loss(kind: str, logits: torch.Tensor, targets: torch.Tensor, out_dims: Sequence[int]) -> torch.Tensor:
    """Training loss of a head's output [B, sum(out_dims)]: cross-entropy (summed over levels for
    hierarchical), binary cross-entropy (multilabel) or MSE (vad)."""
    if kind == "single":
        return nn.functional.cross_entropy(logits, targets)
    if kind == "hierarchical":
        parts = torch.split(logits, list(out_dims), dim=1)
        return sum(nn.functional.cross_entropy(p, targets[:, i]) for i, p in enumerate(parts))
    if kind == "multilabel":
        return nn.functional.binary_cross_entropy_with_logits(logits, targets)
    if kind == "vad":
        return nn.functional.mse_loss(logits, targets)
    raise ValueError(f"unknown task kind {kind!r}")


def task_predictions(kind: str, logits: torch.Tensor, out_dims: Sequence[int]) -> np.ndarray:
    """What the metrics take: class indices [N] / [N, L], sigmoid scores [N, C], or values [N, 3]."""
    logits = logits.detach().float().cpu()
    if kind == "single":
        return logits.argmax(1).numpy()
    if kind == "hierarchical":
        return torch.stack([p.argmax(1) for p in torch.split(logits, list(out_dims), dim=1)], 1).numpy()
    if kind == "multilabel":
        return torch.sigmoid(logits).numpy()
    return logits.numpy()


def _target_tensor(kind: str, targets: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(targets, dtype=torch.long if kind in ("single", "hierarchical") else torch.float32)


def init_head(head: nn.Linear, kind: str, train_targets: np.ndarray) -> nn.Linear:
    """For VAD regression start from the best constant predictor (zero weights, bias = the train
    targets' mean), so the few steps a small dataset gets are not spent unlearning a random offset."""
    if kind == "vad":
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.as_tensor(train_targets, dtype=torch.float32).mean(0))
    return head


def _cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


# --------------------------------------------------------------------------- linear evaluation


@dataclass
class ProbeResult:
    """A trained linear probe: standardisation statistics, the best-on-validation head, history."""

    kind: str
    out_dims: list[int]
    mean: torch.Tensor  # [D]
    std: torch.Tensor  # [D]
    head: nn.Linear  # D -> sum(out_dims)
    best_epoch: int
    best_val: dict[str, float]
    history: list[dict]

    @torch.no_grad()
    def predict(self, features: np.ndarray) -> np.ndarray:
        x = (torch.as_tensor(features, dtype=torch.float32) - self.mean) / self.std
        return task_predictions(self.kind, self.head(x), self.out_dims)


def train_linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, kind: str,
    out_dims: Sequence[int], *, lr: float = 1e-2, epochs: int = 40, batch_size: int = 64,
    weight_decay: float = 0.0, seed: int = 0,
) -> ProbeResult:
    """Train a linear head on frozen features [N, D] (targets as in :mod:`pacl_ray.evaluation.datasets`) with
    AdamW and per-step cosine decay; keep the epoch with the best validation selection score."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.as_tensor(train_x, dtype=torch.float32)
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    x = (x - mean) / std
    y = _target_tensor(kind, train_y)
    val = (torch.as_tensor(val_x, dtype=torch.float32) - mean) / std
    head = init_head(nn.Linear(x.shape[1], int(sum(out_dims))), kind, train_y)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    scheduler = _cosine_schedule(optimizer, epochs * steps_per_epoch)
    best_score, best_state, best_epoch, best_val, history = -math.inf, None, -1, {}, []
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch_size):
            index = order[start : start + batch_size]
            loss = task_loss(kind, head(x[index]), y[index], out_dims)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(index)
        with torch.no_grad():
            val_metrics = metrics.task_metrics(kind, val_y, task_predictions(kind, head(val), out_dims), out_dims)
        score = metrics.selection_score(kind, val_metrics)
        history.append({"epoch": epoch, "train_loss": total / len(x), **{f"val_{k}": v for k, v in val_metrics.items()}})
        if score > best_score or best_state is None:
            best_score, best_epoch, best_val = score, epoch, val_metrics
            best_state = copy.deepcopy(head.state_dict())
    head.load_state_dict(best_state)
    return ProbeResult(kind, list(out_dims), mean, std, head, best_epoch, best_val, history)


def run_linear(cfg: RunConfig, ref: BackboneRef, data: TaskData) -> dict:
    """Linear evaluation of one backbone on one task -> test metrics and selection details."""
    features = extract_features(cfg, ref, data, ("train", "val", "test"))
    probe = train_linear_probe(
        features["train"], data.splits["train"].targets, features["val"], data.splits["val"].targets,
        data.kind, data.out_dims, lr=cfg.evaluate.linear_lr, epochs=cfg.evaluate.linear_epochs,
        batch_size=cfg.evaluate.batch_size, weight_decay=cfg.evaluate.weight_decay, seed=cfg.seed,
    )
    test = metrics.task_metrics(data.kind, data.splits["test"].targets, probe.predict(features["test"]), data.out_dims)
    return {"metrics": test, "best_epoch": probe.best_epoch,
            "val_score": metrics.selection_score(data.kind, probe.best_val)}


# --------------------------------------------------------------------------- fine-tuning


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, split: Split, transform, kind: str):
        self.paths = split.paths
        self.targets = _target_tensor(kind, split.targets)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(load_rgb(self.paths[index])), self.targets[index]


class _FinetuneModel(nn.Module):
    def __init__(self, backbone: nn.Module, num_features: int, out_dims: Sequence[int]):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(num_features, int(sum(out_dims)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def _finetune_job(cfg: RunConfig, ref: BackboneRef, data: TaskData) -> dict:
    """Fine-tune backbone + head on train, select on val, report test (one process, GPU if any)."""
    from pacl_ray.core.backbones import autocast_dtype, create_backbone, default_device, finetune_lr

    torch.manual_seed(cfg.seed)
    device = default_device()
    backbone = create_backbone(ref.name, ref.pretrained, ref.checkpoint, ref.input_size)
    model = _FinetuneModel(backbone.model, backbone.num_features, data.out_dims)
    init_head(model.head, data.kind, data.splits["train"].targets)
    model = model.to(device)
    dtype = autocast_dtype(cfg.evaluate.precision, device)
    backbone_lr = cfg.evaluate.finetune_lr or finetune_lr(ref.name)
    optimizer = torch.optim.AdamW(
        [{"params": model.backbone.parameters(), "lr": backbone_lr},
         {"params": model.head.parameters(), "lr": cfg.evaluate.linear_lr}],
        weight_decay=cfg.evaluate.weight_decay,
    )
    train_set = _ImageDataset(data.splits["train"], backbone.train_transform, data.kind)
    loader_kwargs = dict(batch_size=cfg.evaluate.batch_size, num_workers=cfg.evaluate.num_workers)
    train_loader = torch.utils.data.DataLoader(
        train_set, shuffle=True, drop_last=len(train_set) > cfg.evaluate.batch_size,  # no size-1 BatchNorm batch
        generator=torch.Generator().manual_seed(cfg.seed), **loader_kwargs,
    )
    epochs = cfg.evaluate.finetune_epochs
    scheduler = _cosine_schedule(optimizer, epochs * len(train_loader))

    def predict(split: str) -> np.ndarray:
        loader = torch.utils.data.DataLoader(_ImageDataset(data.splits[split], backbone.eval_transform, data.kind), **loader_kwargs)
        model.eval()
        outputs = []
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            for images, _ in loader:
                outputs.append(model(images.to(device)).float().cpu())
        return task_predictions(data.kind, torch.cat(outputs), data.out_dims)

    best_score, best_state, best_epoch = -math.inf, None, -1
    for epoch in range(epochs):
        model.train()
        for images, targets in train_loader:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(images.to(device))
            loss = task_loss(data.kind, logits.float(), targets.to(device), data.out_dims)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        val = metrics.task_metrics(data.kind, data.splits["val"].targets, predict("val"), data.out_dims)
        score = metrics.selection_score(data.kind, val)
        print(f"[evaluate] finetune {ref.label} on {data.name}: epoch {epoch + 1}/{epochs} val {val}", flush=True)
        if score > best_score or best_state is None:
            best_score, best_epoch = score, epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    test = metrics.task_metrics(data.kind, data.splits["test"].targets, predict("test"), data.out_dims)
    return {"metrics": test, "best_epoch": best_epoch, "val_score": best_score}


def run_finetune(cfg: RunConfig, ref: BackboneRef, data: TaskData) -> dict:
    """Fine-tuning; runs as a Ray task holding one GPU when the cluster has GPUs, else in-process."""
    import ray

    from pacl_ray.stages.runtime import cluster_gpus

    if cluster_gpus() > 0:
        job = ray.remote(num_gpus=max(1.0, cfg.evaluate.num_gpus))(_finetune_job)
        return ray.get(job.remote(cfg, ref, data))
    return _finetune_job(cfg, ref, data)


# --------------------------------------------------------------------------- zero-shot


def prompt_class_name(name: str) -> str:
    """How a label reads inside a prompt: ``Doubt/Confusion`` -> ``doubt or confusion``."""
    return name.replace("/", " or ").replace("_", " ").replace("-", " ").strip().lower()


def class_prompts(template: str, names: Sequence[str]) -> list[str]:
    """Fill a template (``{}`` or the paper's ``[C]``) with each class name."""
    template = template.replace("[C]", "{}")
    if template.count("{}") != 1:
        raise TaskSpecError(f"prompt template {template!r} must contain exactly one {{}} (or [C])")
    return [template.replace("{}", prompt_class_name(n)) for n in names]


def zero_shot_scores(image_features: torch.Tensor, text_embeddings: torch.Tensor, image_proj: torch.Tensor) -> torch.Tensor:
    """Cosines [N, C] between projected images and L2-normalised class text embeddings [C, E];
    ``image_features`` [N, Dv] are raw pooled backbone features, ``image_proj`` [E, Dv]."""
    images = nn.functional.normalize(image_features.float() @ image_proj.T, dim=-1)
    return images @ text_embeddings.T


@functools.lru_cache(maxsize=2)
def _text_encoder(name: str, pooling: str, max_length: int):
    """The frozen text encoder, loaded once per process however many tasks are evaluated."""
    from pacl_ray.core.backbones import TextEncoder

    return TextEncoder(name, pooling, max_length)


def run_zeroshot(cfg: RunConfig, ref: BackboneRef, data: TaskData) -> list[dict]:
    """Zero-shot test metrics per prompt template (plus the template ensemble)."""
    if data.kind == "vad":
        raise TaskSpecError(f"zero-shot is not defined for the VAD regression task {data.name!r}")
    if not ref.export_dir:
        raise ExportError(f"zero-shot needs a PACL export directory (with {EXPORT_HEADS}); {ref.label!r} is not one")
    export = load_export(ref.export_dir)
    encoder = _text_encoder(export.meta["text_encoder"], export.meta["text_pooling"], int(export.meta["text_max_length"]))
    if encoder.dim != export.text_proj.shape[1]:
        raise ExportError(f"{ref.export_dir}: text_proj.weight expects {export.text_proj.shape[1]}-d text "
                          f"features but {export.meta['text_encoder']} gives {encoder.dim}")
    features = torch.as_tensor(extract_features(cfg, ref, data, ("test",))["test"])
    if features.shape[1] != export.image_proj.shape[1]:
        raise ExportError(f"{ref.export_dir}: image_proj.weight expects {export.image_proj.shape[1]}-d image "
                          f"features but the backbone gives {features.shape[1]}")
    templates = list(cfg.evaluate.prompts)
    if not templates:
        raise TaskSpecError("evaluate.prompts is empty; zero-shot needs at least one template")
    # per level (hierarchical) or one group: [template][group] -> normalised text embeddings [C, E]
    embedded = []
    for template in templates:
        groups = []
        for names in data.label_names:
            text = encoder.encode(class_prompts(template, names)).cpu() @ export.text_proj.T
            groups.append(nn.functional.normalize(text, dim=-1))
        embedded.append(groups)
    variants = [(t, g) for t, g in zip(templates, embedded)]
    if len(templates) > 1:
        ensemble = [nn.functional.normalize(torch.stack([e[i] for e in embedded]).mean(0), dim=-1)
                    for i in range(len(data.label_names))]
        variants.append(("ensemble", ensemble))
    results = []
    for prompt, groups in variants:
        scores = [zero_shot_scores(features, g, export.image_proj) for g in groups]
        if data.kind == "single":
            outputs = scores[0].argmax(1).numpy()
        elif data.kind == "hierarchical":
            outputs = torch.stack([s.argmax(1) for s in scores], 1).numpy()
        else:  # multilabel: cosines rank the categories
            outputs = scores[0].numpy()
        results.append({"prompt": prompt, "metrics": metrics.task_metrics(
            data.kind, data.splits["test"].targets, outputs, data.out_dims)})
    return results


# --------------------------------------------------------------------------- results table


def metric_columns(row: dict) -> list[str]:
    return [k for k in row if METRIC_COLUMN.match(k)]


def _format(column: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column == "MSE":
        return f"{value:.3f}"
    if column == "R2":
        return f"{value:.4f}"
    return f"{value:.2f}"


def results_table(rows: Sequence[dict]) -> tuple[str, str]:
    """The Table 1 layout of result rows -> (Markdown, CSV).

    Rows of the table are (protocol, model[, prompt]) in protocol order (linear, finetune, zeroshot)
    and first appearance within; columns are ``"<dataset> <metric>"`` per task in first appearance
    (the task spec is used instead of the dataset name when two tasks would collide). Markdown
    shows paper precision and bolds the best value per column within a protocol; CSV has full
    precision."""
    tasks: dict[str, list[str]] = {}
    for row in rows:
        cols = tasks.setdefault(row["task"], [])
        cols.extend(c for c in metric_columns(row) if c not in cols)
    labels: dict[str, str] = {}
    taken: set[tuple[str, str]] = set()
    for task, cols in tasks.items():
        display = next(r["dataset"] for r in rows if r["task"] == task)
        if any((display, c) in taken for c in cols):
            display = task
        labels[task] = display
        taken.update((display, c) for c in cols)
    columns = [(task, c) for task, cols in tasks.items() for c in cols]
    headers = [f"{labels[t]} {c}" for t, c in columns]
    with_prompt = any(r.get("prompt") for r in rows)
    keys: list[tuple[str, str, str]] = []
    values: dict[tuple[str, str, str], dict] = {}
    for row in rows:
        key = (row["protocol"], row["model"], row.get("prompt") or "")
        if key not in values:
            keys.append(key)
            values[key] = {}
        for c in metric_columns(row):
            values[key][(row["task"], c)] = row[c]
    order = {p: i for i, p in enumerate(PROTOCOLS)}
    keys.sort(key=lambda k: order.get(k[0], len(order)))

    def best(protocol: str, column: tuple[str, str]):
        found = [values[k][column] for k in keys if k[0] == protocol and column in values[k]
                 and not (isinstance(values[k][column], float) and math.isnan(values[k][column]))]
        if len(found) < 2:
            return None
        return max(found) if metrics.metric_direction(column[1]) > 0 else min(found)

    lead = ["Model", "Protocol"] + (["Prompt"] if with_prompt else [])
    lines = ["| " + " | ".join(lead + headers) + " |", "|" + "---|" * (len(lead) + len(headers))]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(lead + headers)
    for key in keys:
        protocol, model, prompt = key
        cells, raw = [], []
        for column in columns:
            value = values[key].get(column)
            text = _format(column[1], value)
            if value is not None and value == best(protocol, column):
                text = f"**{text}**"
            cells.append(text)
            raw.append("" if value is None else repr(float(value)))
        head = [model, PROTOCOL_TITLES.get(protocol, protocol)] + ([prompt] if with_prompt else [])
        lines.append("| " + " | ".join(head + cells) + " |")
        writer.writerow(head + raw)
    return "\n".join(lines) + "\n", buffer.getvalue()


# --------------------------------------------------------------------------- orchestration


def _row_cache_uri(cfg: RunConfig, ref: BackboneRef, data: TaskData, protocol: str) -> str:
    e = cfg.evaluate
    settings: dict[str, Any] = {"seed": cfg.seed, "batch_size": e.batch_size}
    if protocol == "linear":
        settings.update(lr=e.linear_lr, epochs=e.linear_epochs, weight_decay=e.weight_decay)
    elif protocol == "finetune":
        settings.update(lr=e.linear_lr, backbone_lr=e.finetune_lr, epochs=e.finetune_epochs,
                        weight_decay=e.weight_decay, precision=e.precision)
    else:
        settings.update(prompts=list(e.prompts))
    key = cache.content_key("evaluate-row", EVALUATE_VERSION, ref.identity(), ref.export_dir and cache.file_fingerprint(
        os.path.join(ref.export_dir, EXPORT_HEADS)), protocol, data.kind, data.label_names,
        data.fingerprints, settings)
    return storage.join(cfg.output_dir, "evaluate", "rows", f"{key}.json")


def _evaluate_one(cfg: RunConfig, ref: BackboneRef, spec: TaskSpec, data: TaskData, protocol: str) -> list[dict]:
    """Rows for one (backbone, task, protocol), from the row cache when present."""
    uri = _row_cache_uri(cfg, ref, data, protocol)
    if storage.exists(uri):
        cached = json.loads(storage.read_text(uri))
    else:
        if protocol == "linear":
            cached = [run_linear(cfg, ref, data)]
        elif protocol == "finetune":
            cached = [run_finetune(cfg, ref, data)]
        else:
            cached = run_zeroshot(cfg, ref, data)
        storage.write_text(uri, json.dumps(cached, indent=1))
    sizes = {f"n_{k}": len(v) for k, v in data.splits.items()}
    rows = []
    for result in cached:
        rows.append({
            "model": ref.label, "protocol": protocol, "prompt": result.get("prompt", ""),
            "task": spec.text, "dataset": spec.display, "kind": data.kind,
            "backbone": ref.name, "checkpoint": ref.checkpoint, **result["metrics"],
            "best_epoch": result.get("best_epoch"), "val_score": result.get("val_score"),
            **sizes, "quarantined": len(data.quarantine),
        })
    return rows


def _row_key(row: dict) -> tuple:
    return (row["model"], row["protocol"], row.get("prompt") or "", row["task"])


def write_results(out_dir: str, rows: Sequence[dict]) -> list[dict]:
    """Merge rows into ``out_dir/rows.json`` (same model, protocol, prompt and task replaced) and
    rewrite ``results.md`` / ``results.csv``; returns all rows now in ``out_dir``."""
    path = storage.join(out_dir, "rows.json")
    merged = json.loads(storage.read_text(path)) if storage.exists(path) else []
    new_keys = {_row_key(r) for r in rows}
    merged = [r for r in merged if _row_key(r) not in new_keys] + list(rows)
    storage.write_text(path, json.dumps(merged, indent=1, default=str))
    markdown, table_csv = results_table(merged)
    storage.write_text(storage.join(out_dir, "results.md"), markdown)
    storage.write_text(storage.join(out_dir, "results.csv"), table_csv)
    return merged


def evaluate_backbone(
    cfg: RunConfig, backbone: str, checkpoint: str, tasks: list[str], out_dir: str, label: str = "",
    protocol: str | None = None,
) -> list[dict]:
    """Evaluate one backbone on every task under one or more protocols; returns this call's rows
    (one per task and protocol; per prompt for zero-shot) and merges them into ``out_dir``'s
    results table (``results.md``, ``results.csv``, ``rows.json``), saving the resolved config.

    ``backbone``: timm name, ``open_clip:<arch>``, a PACL export directory or a weights file;
    ``checkpoint``: optional local weights (or export directory) for that architecture."""
    ref = resolve_backbone(cfg, backbone, checkpoint, label)
    protocols = parse_protocols(protocol or cfg.evaluate.protocol)
    specs = [parse_task(t, cfg.evaluate.split_seed) for t in tasks]
    if not specs:
        raise TaskSpecError("no tasks given; set evaluate.tasks or pass --task KIND:DATASET=ROOT")
    if "zeroshot" in protocols and not ref.export_dir:
        raise ExportError(f"protocol zeroshot needs a PACL export directory; {backbone!r} is not one")
    storage.makedirs(out_dir)
    save_config(cfg, out_dir)
    loaded = []
    for spec in specs:
        data = load_task(spec)
        print(f"[evaluate] {spec.text}: {data.summary()}", flush=True)
        qname = re.sub(r"[^\w.-]+", "_", f"{spec.kind}-{spec.dataset}-{cache.content_key(spec.text)}")
        storage.write_text(storage.join(out_dir, "quarantine", f"{qname}.json"), json.dumps(data.quarantine, indent=1))
        runnable = [p for p in protocols if not (p == "zeroshot" and data.kind == "vad")]
        if len(runnable) < len(protocols):
            print(f"[evaluate] {spec.text}: zero-shot is not defined for VAD; skipped", flush=True)
        loaded.append((spec, data, runnable))
    _prefetch_features(cfg, ref, loaded)
    rows = []
    for spec, data, runnable in loaded:
        for name in runnable:
            rows.extend(_evaluate_one(cfg, ref, spec, data, name))
    write_results(out_dir, rows)
    return rows


def _prefetch_features(cfg: RunConfig, ref: BackboneRef, loaded: Sequence[tuple[TaskSpec, TaskData, list[str]]]) -> None:
    """Extract the frozen features every uncached (task, protocol) result needs in one Ray Data pass."""
    requests = []
    for _, data, protocols in loaded:
        splits: list[str] = []
        for protocol in protocols:
            if protocol == "finetune" or storage.exists(_row_cache_uri(cfg, ref, data, protocol)):
                continue
            splits.extend(s for s in (("train", "val", "test") if protocol == "linear" else ("test",)) if s not in splits)
        if splits:
            requests.append((data, splits))
    if requests:
        extract_features_many(cfg, ref, requests)


def main(cfg: RunConfig, backbone: str | None = None) -> int:
    """``pacl-ray evaluate``: evaluate ``backbone`` (and, for a PACL export, its initial weights) on
    ``evaluate.tasks``; prints the table and writes it under ``{output_dir}/evaluate/<key>/``."""
    from pacl_ray.stages.runtime import init_ray

    try:
        tasks = list(cfg.evaluate.tasks)
        if not tasks:
            raise TaskSpecError("no tasks given; pass --task KIND:DATASET=ROOT (see pacl_ray.evaluation.evaluate)")
        for task in tasks:
            parse_task(task, cfg.evaluate.split_seed)
        protocols = parse_protocols(cfg.evaluate.protocol)
        ref = resolve_backbone(cfg, backbone)
        runs = [(ref, protocols)]
        if ref.export_dir and cfg.evaluate.compare_initial:
            initial_protocols = [p for p in protocols if p != "zeroshot"]
            if initial_protocols:
                runs.insert(0, (initial_ref(cfg, ref), initial_protocols))
        key = cache.content_key("evaluate", EVALUATE_VERSION, [(r.identity(), r.export_dir, p) for r, p in runs], tasks,
                                to_dict(cfg.evaluate), cfg.seed)
        out_dir = storage.join(cfg.output_dir, "evaluate", key)
        if cache.is_complete(out_dir):
            print(storage.read_text(storage.join(out_dir, "results.md")))
            print(f"evaluate: {out_dir} (cached)")
            return 0
        init_ray(cfg.ray)
        rows = []
        for run_ref, run_protocols in runs:
            run_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone_pretrained=run_ref.pretrained))
            rows.extend(evaluate_backbone(
                run_cfg, run_ref.export_dir or run_ref.name, "" if run_ref.export_dir else run_ref.checkpoint,
                tasks, out_dir, label=run_ref.label, protocol=",".join(run_protocols),
            ))
        save_config(cfg, out_dir)
        cache.mark_complete(out_dir, {"rows": len(rows), "models": [r.label for r, _ in runs], "tasks": tasks})
    except (TaskSpecError, DatasetError, ExportError, FileNotFoundError) as err:
        print(f"pacl-ray evaluate: error: {err}", file=sys.stderr)
        return 2
    print(storage.read_text(storage.join(out_dir, "results.md")))
    print(f"evaluate: {out_dir}")
    return 0
