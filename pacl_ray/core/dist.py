"""All ``torch.distributed`` calls of the project live here.

Without an initialised process group every helper degrades to the single-process answer
(rank 0, world size 1, gathers return their input), so the same training code runs anywhere.

Gradient convention (as SimCLR's GatherLayer): :func:`all_gather_with_grad` sums the incoming
gradient over ranks in its backward pass. When every rank computes the same global-batch loss L,
rank r's local features receive ``world_size * dL/dx_r``; DDP's gradient averaging then divides by
``world_size``, so parameter gradients equal those of one process on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def get_rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


def _gather_sizes(tensor: torch.Tensor) -> list[int]:
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    torch_dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _padded_all_gather(tensor: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """All-gather tensors whose first dimension differs between ranks (pad, gather, trim)."""
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in sizes]
    torch_dist.all_gather(gathered, padded.contiguous())
    return [g[:n] for g, n in zip(gathered, sizes)]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradient over ranks and keeps this slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        sizes = _gather_sizes(tensor)
        ctx.sizes = sizes
        ctx.rank = get_rank()
        return torch.cat(_padded_all_gather(tensor, sizes), dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        torch_dist.all_reduce(grad, op=torch_dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [n_r, ...] from every rank in rank order -> [sum n_r, ...].

    Differentiable: see the module docstring for the gradient convention. Ranks may hold
    different n_r (the last batch of an epoch).
    """
    if not is_initialized() or get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [n_r, ...] (labels, codes) from every rank -> [sum n_r, ...]."""
    if not is_initialized() or get_world_size() == 1:
        return tensor
    with torch.no_grad():
        return torch.cat(_padded_all_gather(tensor, _gather_sizes(tensor)), dim=0)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (a copy; the input is untouched)."""
    if not is_initialized() or get_world_size() == 1:
        return tensor
    out = tensor.detach().clone()
    torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out / get_world_size()


def init_process_group(backend: str, init_method: str, rank: int, world_size: int) -> None:
    """Start a process group (tests and tools; Ray Train starts its own for training)."""
    torch_dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)


def destroy_process_group() -> None:
    if is_initialized():
        torch_dist.destroy_process_group()
