"""Stage 3's optimisation step: the device-side image normalisation, optimiser and schedule, the
fp16 gradient scaler, the finite-loss check (SPEC "Training recipe")."""

from __future__ import annotations

import math
from typing import Optional

import torch

from pacl_ray.config import RunConfig
from pacl_ray.core import backbones
from pacl_ray.stages.train_metrics import LOSS_TERMS


class NonFiniteLossError(RuntimeError):
    """A training step's loss was not finite; the run stopped, nothing was exported."""


class ImageNormalizer:
    """The train batches' images, uint8 [B, 3, H, W] as the decode workers make them
    (:func:`pacl_ray.core.pacl_model.train_transform`, timm's ``use_prefetcher`` form), to the
    model's float32 input ``(x / 255 - mean) / std`` on the training device, as timm's
    ``PrefetchLoader`` does, but in one fused op: ``addcmul(-mean / std, x, 1 / (255 std))`` reads
    the uint8 batch once and writes the float one (no float copy, no separate subtract and divide).
    ``channels_last``: the output is NHWC in memory (the uint8 batch is reordered first, a quarter
    of the bytes of reordering the float one). Raises TypeError for a batch that is not uint8.

    ``mean``/``std``: per channel, in [0, 1] units (the backbone's own:
    :func:`pacl_ray.core.pacl_model.train_normalization`).
    """

    def __init__(self, mean, std, device: torch.device, channels_last: bool = False):
        mean, std = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
        # in float64, then rounded once, so the result matches ToTensor + Normalize to float32 rounding
        self.scale = (1.0 / (255.0 * std)).float().view(1, -1, 1, 1).to(device)
        self.shift = (-mean / std).float().view(1, -1, 1, 1).to(device)
        self.channels_last = channels_last

    @classmethod
    def for_backbone(cls, backbone, device: torch.device, channels_last: bool = False) -> "ImageNormalizer":
        """With the backbone's own mean and std (:func:`pacl_ray.core.pacl_model.train_normalization`)."""
        from pacl_ray.core.pacl_model import train_normalization

        return cls(*train_normalization(backbone), device, channels_last)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"train batch images must be uint8 [B, 3, H, W] (the train transform's output), "
                            f"got {images.dtype}")
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return torch.addcmul(self.shift, images, self.scale)


def cosine_factor(step: int, total: int) -> float:
    """Cosine decay from 1 to 0 over ``total`` steps (the closed form the schedule follows after warmup)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


class StepScheduler:
    """timm's ``CosineLRScheduler`` stepped per optimiser step: linear warmup from 0 over
    ``warmup_steps``, then cosine decay to 0 over the remaining steps (SPEC "Training recipe").

    timm schedulers are stateless about time (the caller passes the update count to
    ``step_update``); this keeps the count, so the training loop calls ``step()`` after each
    optimiser step, as with a torch scheduler, and the count travels in ``state_dict()`` (plain
    values only, so checkpoints load with ``weights_only=True``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0):
        from timm.scheduler import CosineLRScheduler

        if warmup_steps < 0 or (warmup_steps and warmup_steps >= total_steps):
            raise ValueError(
                f"train.warmup_steps={warmup_steps} must be below the run's {total_steps} optimiser steps "
                f"(warmup is followed by the cosine decay)"
            )
        self.num_updates = 0
        self.scheduler = CosineLRScheduler(
            optimizer, t_initial=max(total_steps - warmup_steps, 1), lr_min=0.0, warmup_t=warmup_steps,
            warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False,
        )

    def step(self) -> None:
        """After an optimiser step: set the learning rates of the next one."""
        self.num_updates += 1
        self.scheduler.step_update(self.num_updates)

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "timm": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
        self.scheduler.load_state_dict(state["timm"])
        self.scheduler.step_update(self.num_updates)


def param_groups(model, lr_backbone: float, lr_heads: float, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: backbone and heads at their own learning rates (``name`` backbone /
    heads, read by the step metrics), each split by timm's ``param_groups_weight_decay`` so that
    norm weights and biases (every parameter of one dimension or less) get no weight decay."""
    from timm.optim import param_groups_weight_decay

    groups = []
    heads = torch.nn.ModuleList([model.image_proj, model.text_proj])  # a view; the model keeps its modules
    for name, module, lr in (("backbone", model.backbone, lr_backbone), ("heads", heads, lr_heads)):
        for group in param_groups_weight_decay(module, weight_decay):
            groups.append({**group, "lr": lr, "name": name})
    return groups


def build_optimizer(model, cfg: RunConfig, total_steps: int):
    """AdamW through timm's optimizer factory (``create_optimizer_v2``) over :func:`param_groups`,
    and :class:`StepScheduler` over ``total_steps`` optimiser steps with ``train.warmup_steps``
    of linear warmup (SPEC "Training recipe": weight decay 0.02, none on norms and biases)."""
    from timm.optim import create_optimizer_v2

    lr_backbone = cfg.train.lr_backbone or backbones.backbone_lr(cfg.model.backbone)
    groups = param_groups(model, lr_backbone, cfg.train.lr_heads, cfg.train.weight_decay)
    # fused AdamW on CUDA: one kernel per parameter group instead of one per tensor
    fused = all(p.is_cuda for p in model.parameters())
    optimizer = create_optimizer_v2(groups, opt="adamw", lr=cfg.train.lr_heads, weight_decay=cfg.train.weight_decay,
                                    **({"fused": True} if fused else {}))
    return optimizer, StepScheduler(optimizer, total_steps, cfg.train.warmup_steps)


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
