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


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks whose backward also sums over ranks: every rank's output depends on every
    rank's input, so each input's gradient is the sum of all ranks' output gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.contiguous().clone()
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        torch_dist.all_reduce(grad, op=torch_dist.ReduceOp.SUM)
        return grad


def all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``tensor`` over ranks (the input itself without a process group)."""
    if not is_initialized() or get_world_size() == 1:
        return tensor
    return _AllReduceSumWithGrad.apply(tensor)


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (all ranks), on any
    backend (``torch.nn.SyncBatchNorm`` needs CUDA; this one runs on gloo/CPU too).

    Input [N, C, *] with N = this rank's rows (may differ between ranks, and may be 0). Mean and
    biased variance are taken over every rank's rows (two all-reduces: sum and count, then the
    centred sum of squares), normalisation uses the biased variance and the running variance the
    unbiased one, exactly as ``torch.nn.BatchNorm`` on the concatenated batch; gradients flow
    through the statistics to every rank (the same convention as :func:`all_gather_with_grad`).
    Eval mode, or no process group, is plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects [N, C, *] input, got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and is_initialized() and get_world_size() > 1):
            return super().forward(input)
        x = input if input.dtype in (torch.float32, torch.float64) else input.float()  # statistics in fp32+
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        first = all_reduce_sum_with_grad(torch.cat([x.sum(dims), count]))
        n = first[-1].detach()
        mean = first[:-1] / n
        centred = x - mean.view(shape)
        var = all_reduce_sum_with_grad((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                unbiased = var.detach() * n / torch.clamp(n - 1, min=1)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


_PLAIN_BATCHNORM = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def has_batchnorm(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


def convert_sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Every BatchNorm of ``module`` made to use global-batch statistics: torch's
    ``SyncBatchNorm`` on CUDA (fused NCCL kernels), :class:`SyncBatchNorm` elsewhere. Parameters
    and buffers are kept (the same tensors)."""
    if device.type == "cuda":
        try:  # timm's converter also keeps the activation of its BatchNormAct2d
            from timm.layers import convert_sync_batchnorm as timm_convert
        except ImportError:
            return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return timm_convert(module)
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        if type(module) not in _PLAIN_BATCHNORM:  # e.g. timm's BatchNormAct2d: its activation would be lost
            raise ValueError(f"cannot synchronise {type(module).__name__} (a BatchNorm subclass) on "
                             f"{device.type}; set train.sync_batchnorm=false or train on CUDA")
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module


def init_process_group(backend: str, init_method: str, rank: int, world_size: int) -> None:
    """Start a process group (tests and tools; Ray Train starts its own for training)."""
    torch_dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)


def destroy_process_group() -> None:
    if is_initialized():
        torch_dist.destroy_process_group()
