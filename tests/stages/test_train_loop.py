"""pacl_ray.stages.train_loop: deferred readback (rows, the first non-finite step, the position
check), the one-gather label/feature exchange (two gloo processes), the step model's settings and
the start-up times."""

from __future__ import annotations

import math
import os
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from pacl_ray.core import dist, loss
from pacl_ray.stages.train_loop import (
    StepLog, gather_features, gather_labels, is_conv_net, resolve_channels_last, resolve_compile, startup_line,
    startup_times, step_model,
)
from pacl_ray.stages.train_metrics import step_metrics

B = 8
CPU = torch.device("cpu")


def _optimizer(lr: float):
    return SimpleNamespace(param_groups=[{"name": "backbone", "lr": lr}, {"name": "heads", "lr": 10 * lr}])


def _step_inputs(step: int, temperature: float = 0.07):
    g = torch.Generator().manual_seed(step)
    zv = torch.nn.functional.normalize(torch.randn(B, 4, generator=g), dim=1)
    zt = torch.nn.functional.normalize(torch.randn(B, 4, generator=g), dim=1)
    partition = torch.randint(1, 5, (B,), generator=g)
    labels = torch.randint(0, 2, (B,), generator=g)
    return loss.pacl_loss(zv, zt, partition, labels, labels, temperature), partition


def _queue(log: StepLog, temperatures: list[float], positions=None) -> list[dict]:
    """Queue one step per temperature; returns the rows a per-step readback gives."""
    expected = []
    for step, temperature in enumerate(temperatures):
        losses, partition = _step_inputs(step, temperature)
        optimizer = _optimizer(1e-3 / (step + 1))
        position = positions[step] if positions else torch.arange(step * B, (step + 1) * B)
        log.add(losses, partition, position, optimizer, global_step=10 + step, epoch=1, phase=(1, 2, 3),
                step_in_epoch=step, amp_skipped=0, grad_scale=1.0)
        log.annotate_last(step_time_s=0.5, data_wait_s=0.1)
        row = step_metrics(losses, partition, optimizer, 1, (1, 2, 3), 10 + step)
        row.update(amp_skipped=0, grad_scale=1.0, step_time_s=0.5, data_wait_s=0.1, samples_per_s=B / 0.5)
        expected.append(row)
    return expected


def test_flush_gives_the_rows_of_a_per_step_readback():
    log = StepLog(B)
    expected = _queue(log, [0.07, 0.1, 0.5])
    assert len(log) == 3
    rows, bad = log.flush(CPU)
    assert bad is None and len(log) == 0
    assert rows == expected  # the same floats, keys and order as reading every step back
    assert [r["lr_backbone"] for r in rows] == [1e-3, 1e-3 / 2, 1e-3 / 3]  # the lr when each step ran
    assert log.flush(CPU) == ([], None)


def test_flush_stops_at_the_first_non_finite_step():
    log = StepLog(B)
    expected = _queue(log, [0.07, 0.1, 1e-40, 0.07, 1e-40])  # 1e-40: sim / tau overflows float32
    rows, bad = log.flush(CPU)
    assert rows == expected[:2]
    assert (bad.global_step, bad.epoch, bad.phase) == (12, 1, "123")
    assert set(bad.losses) == {"L1", "L2", "L3", "L4", "total"} and math.isnan(bad.losses["total"])


def test_flush_raises_when_a_batch_holds_another_steps_positions():
    log = StepLog(B, rank=1)
    wrong = torch.arange(B) + B  # step 0 holding step 1's positions
    _queue(log, [0.07], positions=[wrong])
    with pytest.raises(RuntimeError, match=r"rank 1: batch positions \[8, 9, .*\] are not step 0"):
        log.flush(CPU)


def test_single_process_gathers_return_their_inputs():
    codes, f, e = torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([1, 1])
    assert all(torch.equal(a, b) for a, b in zip(gather_labels(codes, f, e), (codes, f, e)))
    zv, zt = torch.randn(2, 3), torch.randn(2, 3)
    out = gather_features(zv, zt)
    assert torch.equal(out[0], zv) and torch.equal(out[1], zt)


# --------------------------------------------------------------------------- two processes

N_PER_RANK = (5, 3)


def _rank_data(rank: int):
    g = torch.Generator().manual_seed(0)
    n = sum(N_PER_RANK)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    codes, f, e = (torch.randint(1, 5, (n,), generator=g), torch.randint(0, 2, (n,), generator=g),
                   torch.randint(0, 2, (n,), generator=g))
    start = sum(N_PER_RANK[:rank])
    rows = slice(start, start + N_PER_RANK[rank])
    return x[rows], codes[rows], f[rows], e[rows]


def _grads(x, codes, f, e, one_gather: bool):
    torch.manual_seed(1)
    heads = torch.nn.Linear(6, 4, bias=False).double(), torch.nn.Linear(6, 4, bias=False).double()
    zv, zt = (torch.nn.functional.normalize(h(x), dim=1) for h in heads)
    if one_gather:
        codes_all, f_all, e_all = gather_labels(codes, f, e)
        zv_all, zt_all = gather_features(zv, zt)
    else:
        codes_all, f_all, e_all = (dist.all_gather_no_grad(t) for t in (codes, f, e))
        zv_all, zt_all = dist.all_gather_with_grad(zv), dist.all_gather_with_grad(zt)
    total = loss.pacl_loss(zv_all, zt_all, codes_all, f_all, e_all, 0.1)["total"]
    total.backward()
    return total.detach(), [h.weight.grad for h in heads], codes_all


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", f"file://{init_file}", rank, world)
    try:
        data = _rank_data(rank)
        one = _grads(*data, one_gather=True)
        separate = _grads(*data, one_gather=False)
        # Rank 1 alone sees a non-finite step 1 of 3: both ranks must stop at it.
        log = StepLog(B, rank)
        _queue(log, [0.07, 1e-40 if rank == 1 else 0.07, 0.07])
        rows, bad = log.flush(CPU)
        torch.save({"one": one, "separate": separate, "rows": len(rows), "bad_step": bad and bad.global_step},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_one_gather_per_batch_equals_separate_gathers_and_ranks_agree_on_non_finite_steps():
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True,
                           start_method="spawn")
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    full_codes = torch.cat([_rank_data(r)[1] for r in range(2)])
    for res in results:
        (loss_one, grads_one, codes_one), (loss_sep, grads_sep, codes_sep) = res["one"], res["separate"]
        assert torch.equal(codes_one, full_codes) and torch.equal(codes_sep, full_codes)
        assert torch.equal(loss_one, loss_sep)
        for a, b in zip(grads_one, grads_sep):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert (res["rows"], res["bad_step"]) == (1, 11)


# --------------------------------------------------------------------------- step model, start-up


def test_compile_and_channels_last_defaults():
    assert resolve_compile(None, torch.device("cuda")) and not resolve_compile(None, CPU)
    assert resolve_compile(True, CPU) and not resolve_compile(False, torch.device("cuda"))
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3))
    patch_embed_only = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 16, stride=16), torch.nn.Flatten(),
                                           torch.nn.Linear(4, 2))
    assert is_conv_net(conv) and not is_conv_net(patch_embed_only)
    assert resolve_channels_last(None, conv, torch.device("cuda")) and not resolve_channels_last(None, conv, CPU)
    assert not resolve_channels_last(None, patch_embed_only, torch.device("cuda"))
    assert resolve_channels_last(True, patch_embed_only, CPU)


def test_compiled_step_model_shares_the_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert step_model(model, compile=False) is model
    compiled = step_model(model, compile=True, backend="eager")  # the Dynamo path without a C++ toolchain
    x = torch.randn(5, 3)
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]  # no _orig_mod. prefix


def test_startup_times_split_the_seconds_to_the_first_step():
    times = startup_times(100.0, 103.0, {"loop_started_at": 110.0, "first_step_at": 112.5})
    assert times == {"start_to_first_step_s": 12.5, "driver_setup_s": 3.0, "worker_start_s": 7.0,
                     "worker_to_first_step_s": 2.5}
    assert "first step 12.5 s after start" in startup_line(times) and "worker start 7.0 s" in startup_line(times)
    assert startup_times(100.0, 103.0, {}) == {}
