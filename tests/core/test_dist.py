"""pacl_ray.core.dist: single-process fallbacks, and a two-process gloo run showing that the loss on the
gathered global batch, and the DDP-averaged gradients, equal one process on the concatenated batch."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from pacl_ray.core import dist
from pacl_ray.core.loss import pacl_loss

N_PER_RANK = (5, 3)  # uneven on purpose: the last batch of an epoch
D_IN, D_OUT = 6, 4


def _batch():
    g = torch.Generator().manual_seed(0)
    n = sum(N_PER_RANK)
    x_img = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    x_txt = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    code = torch.randint(1, 5, (n,), generator=g)
    f = torch.randint(0, 2, (n,), generator=g)
    e = torch.randint(0, 2, (n,), generator=g)
    return x_img, x_txt, code, f, e


def _heads():
    torch.manual_seed(1)
    return (torch.nn.Linear(D_IN, D_OUT, bias=False).double(),
            torch.nn.Linear(D_IN, D_OUT, bias=False).double())


def _loss(img_head, txt_head, x_img, x_txt, code, f, e):
    zv = torch.nn.functional.normalize(img_head(x_img), dim=1)
    zt = torch.nn.functional.normalize(txt_head(x_txt), dim=1)
    zv_all = dist.all_gather_with_grad(zv)
    zt_all = dist.all_gather_with_grad(zt)
    code_all, f_all, e_all = (dist.all_gather_no_grad(t) for t in (code, f, e))
    return pacl_loss(zv_all, zt_all, code_all, f_all, e_all, 0.1)["total"], zv


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", f"file://{init_file}", rank, world)
    try:
        x_img, x_txt, code, f, e = _batch()
        start = sum(N_PER_RANK[:rank])
        rows = slice(start, start + N_PER_RANK[rank])
        img_head, txt_head = _heads()
        loss, zv = _loss(img_head, txt_head, x_img[rows], x_txt[rows], code[rows], f[rows], e[rows])
        zv.retain_grad()
        loss.backward()
        # What DDP does to parameter gradients: average over ranks.
        grads = [dist.all_reduce_mean(p.grad) for p in (img_head.weight, txt_head.weight)]
        torch.save(
            {"loss": loss.detach(), "grads": grads, "feature_grad": zv.grad, "rank": dist.get_rank(),
             "world": dist.get_world_size()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_single_process_fallbacks():
    assert dist.get_rank() == 0 and dist.get_world_size() == 1 and dist.is_main_process()
    t = torch.randn(3, 2, requires_grad=True)
    assert dist.all_gather_with_grad(t) is t
    assert dist.all_gather_no_grad(t) is t
    assert torch.equal(dist.all_reduce_mean(t), t)
    dist.barrier()  # no-op


def test_two_process_gather_matches_concatenated_batch():
    x_img, x_txt, code, f, e = _batch()
    img_head, txt_head = _heads()
    ref_loss, ref_zv = _loss(img_head, txt_head, x_img, x_txt, code, f, e)
    ref_zv.retain_grad()
    ref_loss.backward()

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.start_processes(_worker, args=(2, init_file, tmp), nprocs=2, join=True, start_method="spawn")
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]

    for r, res in enumerate(results):
        assert (res["rank"], res["world"]) == (r, 2)
        assert res["loss"].item() == pytest.approx(ref_loss.item(), rel=1e-12)
        torch.testing.assert_close(res["grads"][0], img_head.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res["grads"][1], txt_head.weight.grad, rtol=1e-10, atol=1e-12)
        # Local features get world_size x the single-process gradient (see dist's docstring).
        start = sum(N_PER_RANK[:r])
        expected = 2 * ref_zv.grad[start : start + N_PER_RANK[r]]
        torch.testing.assert_close(res["feature_grad"], expected, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- SyncBatchNorm

BN_ROWS = (5, 3)  # uneven per-rank batches


def _bn_data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(3, sum(BN_ROWS), 3, 12, 12, generator=g, dtype=torch.float64), torch.randn(
        sum(BN_ROWS), 8, generator=g, dtype=torch.float64)


def _bn_model(sync: bool):
    """A small BatchNorm CNN (a ResNet stem and a block's conv-BN-ReLU pairs)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8),
    ).double()
    return dist.convert_sync_batchnorm(model, torch.device("cpu")) if sync else model


def _bn_train(model, images, targets, rows: slice) -> dict:
    """Three SGD steps on the global-batch loss; rank-local rows, gradients averaged as DDP does."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        out = dist.all_gather_with_grad(model(images[step][rows]))
        loss = ((out - targets) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            p.grad = dist.all_reduce_mean(p.grad)
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bn_worker(rank: int, world: int, init_file: str, out_dir: str, sync: bool) -> None:
    dist.init_process_group("gloo", f"file://{init_file}", rank, world)
    try:
        images, targets = _bn_data()
        start = sum(BN_ROWS[:rank])
        state = _bn_train(_bn_model(sync), images, targets, slice(start, start + BN_ROWS[rank]))
        torch.save(state, os.path.join(out_dir, f"bn{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _bn_two_ranks(sync: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_bn_worker, args=(2, os.path.join(tmp, "init"), tmp, sync), nprocs=2, join=True,
                           start_method="spawn")
        return [torch.load(os.path.join(tmp, f"bn{r}.pt")) for r in range(2)]


def test_sync_batchnorm_two_ranks_train_as_one_process():
    images, targets = _bn_data()
    reference = _bn_train(_bn_model(sync=False), images, targets, slice(None))
    synced = _bn_two_ranks(sync=True)
    for state in synced:
        assert state.keys() == reference.keys()  # conversion keeps the state_dict (checkpoints, export)
        for name, value in reference.items():
            torch.testing.assert_close(state[name], value, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    # Control: per-rank statistics (plain BatchNorm) do not give the single-process result.
    unsynced = _bn_two_ranks(sync=False)[0]
    assert any(not torch.allclose(unsynced[k], v, rtol=1e-6, atol=1e-8) for k, v in reference.items()
               if v.is_floating_point())


def test_sync_batchnorm_without_a_group_is_batchnorm():
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(4)
    synced = dist.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(4)), torch.device("cpu"))[0]
    assert isinstance(synced, dist.SyncBatchNorm) and dist.has_batchnorm(torch.nn.Sequential(plain))
    x = torch.randn(6, 4, 3, 3)
    torch.testing.assert_close(synced(x), plain(x))
    torch.testing.assert_close(synced.running_var, plain.running_var)


def test_sync_batchnorm_refuses_subclasses_it_would_break():
    class BatchNormAct(torch.nn.BatchNorm2d):
        pass

    with pytest.raises(ValueError, match="cannot synchronise BatchNormAct.*train.sync_batchnorm=false"):
        dist.convert_sync_batchnorm(torch.nn.Sequential(BatchNormAct(4)), torch.device("cpu"))
