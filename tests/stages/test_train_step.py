"""Stage 3's step: the device-side image normalisation, the finite-loss check and the fp16 gradient scaler."""

from __future__ import annotations

import math

import pytest
import torch

from pacl_ray.core import loss
from pacl_ray.stages.train_step import ImageNormalizer, grad_scaler, nonfinite_terms, optimizer_step

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _photo(width: int, height: int, seed: int = 0):
    """Texture with edges everywhere, so any resampling difference shows."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.int64)
    return Image.fromarray(np.clip(big + rng.integers(-30, 30, (height, width, 3)), 0, 255).astype(np.uint8))


def _seeded(transform, image, seed: int):
    import random

    random.seed(seed)
    torch.manual_seed(seed)  # timm/torchvision transforms draw from both generators
    return transform(image)


def test_device_normalisation_of_the_uint8_batch_gives_the_former_float_input():
    """The new path (uint8 transform, ImageNormalizer) against the one before issue #21 (timm's
    crop + ToTensor + Normalize on the CPU) with the same crop parameters: within uint8 rounding
    (1/255/std) everywhere with timm's crop, and inside the crop with the one-pass crop (whose
    edges read the real neighbours: tests/core/test_pacl_model.py)."""
    from pacl_ray.core.pacl_model import train_transform

    image, cpu = _photo(120, 96), torch.device("cpu")
    before = train_transform(32, normalize=(CLIP_MEAN, CLIP_STD))
    before.transforms[0] = before.transforms[0].crop  # timm's RandomResizedCropAndInterpolation, as before
    now = train_transform(32)
    now_timm_crop = train_transform(32)
    now_timm_crop.transforms[0] = now_timm_crop.transforms[0].crop
    normalize = ImageNormalizer(CLIP_MEAN, CLIP_STD, cpu)
    tolerance = 1 / 255 / min(CLIP_STD) + 1e-5
    for seed in range(8):
        expected = _seeded(before, image, seed)
        batch = torch.stack([_seeded(now, image, seed), _seeded(now_timm_crop, image, seed)])
        assert batch.dtype == torch.uint8
        out = normalize(batch)
        assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 32)
        assert (out[1] - expected).abs().max() <= tolerance
        torch.testing.assert_close(out[1], expected, atol=1e-5, rtol=0)  # the same pixels: float rounding only
        assert (out[0] - expected)[:, 3:-3, 3:-3].abs().max() <= tolerance


def test_normalizer_is_one_op_and_gives_channels_last_on_request():
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    cpu = torch.device("cpu")
    plain = ImageNormalizer(CLIP_MEAN, CLIP_STD, cpu)(x)
    nhwc = ImageNormalizer(CLIP_MEAN, CLIP_STD, cpu, channels_last=True)(x)
    assert plain.is_contiguous() and nhwc.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, nhwc)
    expected = (x.double() / 255 - torch.tensor(CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(plain.double(), expected, atol=2e-6, rtol=0)
    with pytest.raises(TypeError, match="uint8"):
        ImageNormalizer(CLIP_MEAN, CLIP_STD, cpu)(x.float())


def test_normalizer_for_a_backbone_uses_its_own_mean_and_std():
    from pacl_ray.core.pacl_model import build_model, train_normalization

    _, backbone = build_model(4, backbone="test_convnext", pretrained="false", image_size=32)
    normalize = ImageNormalizer.for_backbone(backbone, torch.device("cpu"))
    mean, std = train_normalization(backbone)
    assert mean == tuple(backbone.data_config["mean"]) and std == tuple(backbone.data_config["std"])
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    torch.testing.assert_close(normalize(x)[0, :, 0, 0], (1 - torch.tensor(mean)) / torch.tensor(std))


def _losses(temperature: float) -> dict:
    torch.manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    return loss.pacl_loss(features, features.flip(0), torch.tensor([1, 2, 3, 4] * 2), torch.zeros(8, dtype=torch.long),
                          torch.zeros(8, dtype=torch.long), temperature)


def test_a_temperature_that_overflows_fp32_gives_non_finite_terms():
    assert nonfinite_terms(_losses(0.07)) == {}
    bad = nonfinite_terms(_losses(1e-40))  # sim / tau exceeds float32's range
    assert set(bad) == {"L1", "L2", "L3", "L4", "total"} and not math.isfinite(bad["total"])


def test_scaler_only_for_fp16():
    cpu = torch.device("cpu")
    assert grad_scaler(torch.float16, cpu).is_enabled()
    assert not grad_scaler(torch.bfloat16, cpu).is_enabled() and not grad_scaler(None, cpu).is_enabled()


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_fp16_scaler_skips_and_counts_an_overflowing_step():
    model, optimizer = _model_and_optimizer()
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**8)
    before = [p.detach().clone() for p in model.parameters()]
    overflow = model(torch.tensor([[float("inf"), 1.0, 1.0]])).sum() * 0 + model.weight.sum() * float("inf")
    assert optimizer_step(model, optimizer, scaler, overflow, grad_clip=1.0) is True
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the step was skipped
    assert scaler.get_scale() == 2.0**7
    assert optimizer_step(model, optimizer, scaler, model(torch.ones(1, 3)).sum(), grad_clip=0.0) is False
    assert not torch.equal(before[0], model.weight)


def test_disabled_scaler_steps_exactly_like_plain_backward():
    model, optimizer = _model_and_optimizer()
    reference, ref_optimizer = _model_and_optimizer()
    x = torch.randn(4, 3)
    assert optimizer_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), model(x).pow(2).sum(), 0.5) is False
    ref_optimizer.zero_grad()
    reference(x).pow(2).sum().backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    ref_optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- optimiser and schedule (SPEC Training recipe)


def _pacl_model_and_cfg(**train):
    from pacl_ray import config
    from pacl_ray.core.pacl_model import build_model

    cfg = config.from_dict({"model": {"backbone": "test_resnet", "backbone_pretrained": "false", "embed_dim": 8},
                            "train": {"image_size": 32, **train}})
    model, _ = build_model(5, **config.model_args(cfg))
    return model, cfg


def test_adamw_from_timm_without_decay_on_norms_and_biases(monkeypatch):
    import timm.optim

    from pacl_ray.stages.train_step import build_optimizer

    calls = []
    real = timm.optim.create_optimizer_v2
    monkeypatch.setattr(timm.optim, "create_optimizer_v2", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    model, cfg = _pacl_model_and_cfg(lr_backbone=2e-4, lr_heads=3e-3)
    optimizer, _ = build_optimizer(model, cfg, total_steps=10)
    assert calls and calls[0]["opt"] == "adamw" and isinstance(optimizer, torch.optim.AdamW)
    decay = {id(p): (g["weight_decay"], g["lr"], g["name"]) for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.backbone.named_parameters():
        expected = 0.0 if p.ndim <= 1 or name.endswith(".bias") else 0.02
        assert decay[id(p)] == (expected, 2e-4, "backbone"), name
    assert any(p.ndim == 1 for p in model.backbone.parameters())  # BatchNorm weights and biases exist
    for p in (model.image_proj.weight, model.text_proj.weight):
        assert decay[id(p)] == (0.02, 3e-3, "heads")
    assert len(decay) == sum(1 for _ in model.parameters())  # every parameter, once


def test_schedule_is_linear_warmup_then_cosine_per_step():
    from pacl_ray.stages.train_step import build_optimizer, cosine_factor

    total = 12
    for warm in (0, 4):
        model, cfg = _pacl_model_and_cfg(lr_heads=1e-3, warmup_steps=warm)
        optimizer, scheduler = build_optimizer(model, cfg, total)
        lrs = []
        for _ in range(total):
            lrs.append(optimizer.param_groups[-1]["lr"])  # the heads' lr of this step
            scheduler.step()
        if warm == 0:
            expected = [1e-3 * cosine_factor(s, total) for s in range(total)]
        else:
            expected = [1e-3 * s / warm for s in range(warm)] + [1e-3 * cosine_factor(s, total - warm) for s in range(total - warm)]
        assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-15), warm


def test_warmup_longer_than_the_run_is_refused():
    from pacl_ray.stages.train_step import build_optimizer

    model, cfg = _pacl_model_and_cfg(warmup_steps=10)
    with pytest.raises(ValueError, match=r"train.warmup_steps=10 must be below the run's 10 optimiser steps"):
        build_optimizer(model, cfg, 10)


def test_optimizer_and_scheduler_resume_bit_exactly_through_a_checkpoint(tmp_path):
    from pacl_ray.stages.checkpoint import load_state, write_state
    from pacl_ray.stages.train_step import build_optimizer

    total = 8

    def run(model, optimizer, scheduler, steps):
        lrs = []
        for step in steps:
            torch.manual_seed(step)
            z_image, z_text = model(torch.randn(4, 3, 32, 32), torch.randn(4, 5))
            optimizer.zero_grad()
            (z_image @ z_text.T).diagonal().sum().neg().backward()
            optimizer.step()
            scheduler.step()
            lrs.append([g["lr"] for g in optimizer.param_groups])
        return lrs

    model, cfg = _pacl_model_and_cfg(warmup_steps=2)
    model.eval()  # BatchNorm statistics out of the way; parameters and optimiser state are what resume
    optimizer, scheduler = build_optimizer(model, cfg, total)
    straight = run(model, optimizer, scheduler, range(total))
    final = {k: v.clone() for k, v in model.state_dict().items()}

    model, _ = _pacl_model_and_cfg(warmup_steps=2)
    model.eval()
    optimizer, scheduler = build_optimizer(model, cfg, total)
    first = run(model, optimizer, scheduler, range(3))
    write_state(str(tmp_path), model, optimizer, scheduler, None, {"epoch": 0}, [])
    state = load_state(str(tmp_path))  # weights_only=True: the timm scheduler state is plain values

    model, _ = _pacl_model_and_cfg(warmup_steps=2)
    model.eval()
    model.load_state_dict(state["model"])
    optimizer, scheduler = build_optimizer(model, cfg, total)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    assert [g["lr"] for g in optimizer.param_groups] == first[-1]
    assert first + run(model, optimizer, scheduler, range(3, total)) == straight
    for key, value in model.state_dict().items():
        assert torch.equal(value, final[key]), key
