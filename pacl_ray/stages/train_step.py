"""Stage 3's optimisation step: optimiser and schedule, the fp16 gradient scaler, the finite-loss
check (SPEC "Training recipe")."""

from __future__ import annotations

import math
from typing import Optional

import torch

from pacl_ray.config import RunConfig
from pacl_ray.core import backbones
from pacl_ray.stages.train_metrics import LOSS_TERMS


class NonFiniteLossError(RuntimeError):
    """A training step's loss was not finite; the run stopped, nothing was exported."""


def cosine_factor(step: int, total: int) -> float:
    """Cosine decay from 1 to 0 over ``total`` optimiser steps."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def build_optimizer(model, cfg: RunConfig, total_steps: int):
    """AdamW over the backbone and head parameter groups (named ``backbone``/``heads``) and a
    per-step cosine schedule over ``total_steps``."""
    from pacl_ray.core.pacl_model import head_parameters

    lr_backbone = cfg.train.lr_backbone or backbones.backbone_lr(cfg.model.backbone)
    groups = [
        {"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": lr_backbone, "name": "backbone"},
        {"params": head_parameters(model), "lr": cfg.train.lr_heads, "name": "heads"},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay, fused=all(p.is_cuda for p in model.parameters()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_factor(step, total_steps))
    return optimizer, scheduler


def grad_scaler(amp_dtype: Optional[torch.dtype], device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 autocast (bf16 and fp32 keep fp32's range)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


def nonfinite_terms(losses: dict) -> dict[str, float]:
    """The loss terms that are not finite ({} when all are), as floats."""
    values = {k: float(losses[k].detach()) for k in LOSS_TERMS}
    return values if not all(math.isfinite(v) for v in values.values()) else {}


def optimizer_step(model, optimizer, scaler: torch.amp.GradScaler, total: torch.Tensor, grad_clip: float) -> bool:
    """Backward, optional gradient clipping, and the (scaled) optimiser step.

    Returns True when the scaler skipped the step because its gradients overflowed (fp16 only;
    always False with a disabled scaler)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    # The scaler lowers its scale exactly when it found inf/NaN gradients and skipped the step.
    return scaler.is_enabled() and scaler.get_scale() < scale
