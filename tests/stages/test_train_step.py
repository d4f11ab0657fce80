"""Stage 3's step: the finite-loss check and the fp16 gradient scaler."""

from __future__ import annotations

import math

import torch

from pacl_ray.core import loss
from pacl_ray.stages.train_step import grad_scaler, nonfinite_terms, optimizer_step


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
