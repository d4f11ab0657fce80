"""pacl_loss (masks + loss, forward + backward) against plain CLIP InfoNCE on the same features.

    python benchmarks/loss_bench.py [--sizes 64 512 4096] [--dim 768] [--device cpu|cuda]

Prints, per batch size N, the median time of each and their ratio, measured side by side in one
run. The issue's target: the PACL mask building costs at most 2x the plain loss at N = 4096 on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pacl_ray.core.loss import clip_loss, pacl_loss


def _time(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(n: int, dim: int, device: str, repeats: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    zv = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1).to(device)
    zt = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1).to(device)
    code = torch.randint(1, 5, (n,), generator=g).to(device)
    f = torch.randint(0, 2, (n,), generator=g).to(device)
    e = torch.randint(0, 2, (n,), generator=g).to(device)
    zv.requires_grad_(True)
    zt.requires_grad_(True)

    def run_pacl():
        pacl_loss(zv, zt, code, f, e, 0.07)["total"].backward()

    def run_clip():
        clip_loss(zv, zt, 0.07).backward()

    return _time(run_pacl, repeats, device), _time(run_clip, repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 512, 4096])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"device={args.device} threads={torch.get_num_threads()} D={args.dim} (median of {args.repeats})")
    print(f"{'N':>6} {'pacl ms':>10} {'clip ms':>10} {'ratio':>7}")
    for n in args.sizes:
        pacl_s, clip_s = bench(n, args.dim, args.device, args.repeats)
        print(f"{n:>6} {pacl_s * 1e3:>10.2f} {clip_s * 1e3:>10.2f} {pacl_s / clip_s:>7.2f}")


if __name__ == "__main__":
    main()
