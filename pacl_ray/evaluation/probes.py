"""Trained heads on a backbone (paper 4.4): the linear probe and fine-tuning.

* ``linear`` -- frozen backbone. Pooled features of every split come from
  :mod:`pacl_ray.evaluation.features`. A linear head (one per level for hierarchical tasks, trained
  together) is trained on standardised features for ``linear_epochs`` (40) with lr ``linear_lr``
  (1e-2). **Choice**: the paper gives only the head's lr and says the other settings follow its
  section 4.2, so the optimiser is AdamW (weight decay ``evaluate.weight_decay``, default 0) with
  per-step cosine decay and batch size ``evaluate.batch_size`` (64). Losses: cross-entropy (summed
  over levels), binary cross-entropy (multi-label), MSE (VAD; the head starts at the train mean).
  :func:`train_linear_probe` is the project's one linear probe (the embedded world's gap
  measurement uses it too).
* ``finetune`` -- the whole backbone is trained with the head (AdamW, cosine): backbone lr
  ``evaluate.finetune_lr`` or :func:`pacl_ray.core.backbones.finetune_lr` (1e-4 ResNet-50, 1e-5
  others), head lr ``linear_lr``, ``finetune_epochs`` epochs, the backbone's train transform. One
  process (a Ray task holding one GPU when the cluster has GPUs); not distributed over workers.

Model selection: the epoch with the best validation score (mean accuracy over levels, mAP, or lowest
MSE); its test metrics are reported. Units as in Table 1 (see :mod:`pacl_ray.core.metrics`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pacl_ray.config import RunConfig
from pacl_ray.core import metrics
from pacl_ray.evaluation.datasets import Split, TaskData
from pacl_ray.evaluation.features import extract_features
from pacl_ray.evaluation.resolve import BackboneRef
from pacl_ray.formats.export import local_file
from pacl_ray.formats.images import load_rgb, min_side_for


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
    weight_decay: float = 0.0, seed: int = 0, progress=None,
) -> ProbeResult:
    """Train a linear head on frozen features [N, D] (targets as in :mod:`pacl_ray.evaluation.datasets`) with
    AdamW and per-step cosine decay; keep the epoch with the best validation selection score.
    ``progress``: a :class:`pacl_ray.stages.runtime.Progress` that each epoch adds one to, or None."""
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
        if progress is not None:
            progress.update(1)
    head.load_state_dict(best_state)
    return ProbeResult(kind, list(out_dims), mean, std, head, best_epoch, best_val, history)


def run_linear(cfg: RunConfig, ref: BackboneRef, data: TaskData) -> dict:
    """Linear evaluation of one backbone on one task -> test metrics and selection details."""
    from pacl_ray.stages.runtime import watched

    features = extract_features(cfg, ref, data, ("train", "val", "test"))
    # A line at least every runtime.PROGRESS_INTERVAL_S seconds while training takes longer.
    with watched(f"[evaluate] linear probe {ref.label} on {data.name}", cfg.evaluate.linear_epochs,
                 "epochs") as watch:
        probe = train_linear_probe(
            features["train"], data.splits["train"].targets, features["val"], data.splits["val"].targets,
            data.kind, data.out_dims, lr=cfg.evaluate.linear_lr, epochs=cfg.evaluate.linear_epochs,
            batch_size=cfg.evaluate.batch_size, weight_decay=cfg.evaluate.weight_decay, seed=cfg.seed,
            progress=watch.progress,
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
        self.min_side = min_side_for(transform)  # large JPEGs decode at reduced scale, never below the transform's need

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.transform(load_rgb(self.paths[index], min_side=self.min_side)), self.targets[index]


class _FinetuneModel(nn.Module):
    def __init__(self, backbone: nn.Module, num_features: int, out_dims: Sequence[int]):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(num_features, int(sum(out_dims)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def _finetune_job(cfg: RunConfig, ref: BackboneRef, data: TaskData) -> dict:
    """Fine-tune backbone + head on train, select on val, report test (one process, GPU if any)."""
    from pacl_ray.core.backbones import autocast, create_backbone, default_device, finetune_lr

    torch.manual_seed(cfg.seed)
    device = default_device()
    backbone = create_backbone(ref.name, ref.pretrained, local_file(ref.checkpoint), ref.input_size,
                               **ref.backbone_args())
    model = _FinetuneModel(backbone.model, backbone.num_features, data.out_dims)
    init_head(model.head, data.kind, data.splits["train"].targets)
    model = model.to(device)
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
        with torch.no_grad(), autocast(device, cfg.evaluate.precision):
            for images, _ in loader:
                outputs.append(model(images.to(device)).float().cpu())
        return task_predictions(data.kind, torch.cat(outputs), data.out_dims)

    from pacl_ray.stages.runtime import watched

    best_score, best_state, best_epoch = -math.inf, None, -1
    # Besides the line per epoch, one at least every runtime.PROGRESS_INTERVAL_S seconds mid-epoch.
    with watched(f"[evaluate] finetune {ref.label} on {data.name}", epochs * len(train_loader), "steps") as watch:
        for epoch in range(epochs):
            model.train()
            for images, targets in train_loader:
                with autocast(device, cfg.evaluate.precision):
                    logits = model(images.to(device))
                loss = task_loss(data.kind, logits.float(), targets.to(device), data.out_dims)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                watch.progress.update(1)
            watch.progress.phase = f"validating after epoch {epoch + 1}"
            val = metrics.task_metrics(data.kind, data.splits["val"].targets, predict("val"), data.out_dims)
            watch.progress.phase = ""
            score = metrics.selection_score(data.kind, val)
            shown = ", ".join(f"{name} {value:.4g}" for name, value in val.items())
            print(f"[evaluate] finetune {ref.label} on {data.name}: epoch {epoch + 1}/{epochs} val {shown}", flush=True)
            if score > best_score or best_state is None:
                best_score, best_epoch = score, epoch
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        watch.progress.phase = f"testing epoch {best_epoch + 1}"
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
