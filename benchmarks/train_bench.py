"""Training-loop benchmarks for Stage 3 (issue #5).

From one run it prints:

1. the median step time of the Ray Train loop (1 worker; data streamed and decoded by Ray Data)
   against a plain single-process PyTorch loop doing the same forward/backward/optimiser step on
   the same batches (pre-decoded in memory), as a ratio (target <= 1.10), and the largest relative
   difference between the two loss trajectories (they must agree: same batches, same model);
2. the speed-up from cached text features against running the frozen text encoder (the offline
   all-MiniLM-L6-v2) inside every step;
3. with ``--gpu``: images/s per GPU for ResNet-50 and ViT-B/16 at 224 px in bf16 (forward +
   backward + AdamW step of the PACL model and loss on synthetic tensors) and the fraction of the
   GPU's dense bf16 peak that the achieved FLOP rate is (FLOPs counted by
   ``torch.utils.flop_counter``).

    HF_HUB_OFFLINE=1 python benchmarks/train_bench.py                 # CPU parts
    python benchmarks/train_bench.py --gpu --skip-cpu                  # GPU throughput only
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pacl_ray import config
from pacl_ray.core import loss
from pacl_ray.core import backbones
from pacl_ray.world import stage_tables
from pacl_ray.stages.cache import StageOutput
from pacl_ray.core.pacl_model import build_model
from pacl_ray.stages.train import _decode_batch, _optimizer, _seed_of, epoch_phases, epoch_positions, load_state, load_training_table, run_train

WORDS = "happy sad calm angry bright dark storm beach dog city night joy fear love gloomy sunny".split()


def write_world(root: Path, n: int, text_dim: int, image_px: int, seed: int = 0) -> tuple[dict[str, StageOutput], list[str]]:
    """Random images and features as the four upstream Parquet tables; also returns the texts."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, 20)) for _ in range(n)]
    codes = rng.integers(1, 5, n)
    outs = stage_tables.write_stage_tables(root, codes, text_dim, seed=seed, image_px=image_px, image_format="JPEG",
                                        texts=texts)
    return outs, texts


def same_batches(cfg, outs) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """Every step's global batch exactly as the Ray loop sees it (order, transforms), decoded."""
    meta = load_training_table(outs["ingest"], outs["partition"], outs["embed"], outs["cluster"], cfg)
    pairs = pq.read_table(outs["ingest"].path("pairs"), columns=["id", "image"])
    image_of = dict(zip(pairs.column("id").to_pylist(), pairs.column("image").to_pylist()))
    table = meta.append_column("image", pa.array([image_of[i] for i in meta.column("id").to_pylist()], pa.binary()))
    codes = meta.column("partition").to_numpy()
    _, backbone = build_model(cfg, int(meta.column("text_feature").type.list_size))
    B, batches = cfg.train.global_batch_size, []
    for epoch, phase in enumerate(epoch_phases(cfg)):
        pos = epoch_positions(codes, phase, cfg.seed, epoch, B)
        order = np.argsort(np.where(pos >= 0, pos, np.iinfo(np.int64).max))[: int((pos >= 0).sum())]
        for s in range(len(order) // B):
            rows = order[s * B:(s + 1) * B]
            batch = table.take(pa.array(rows)).append_column("position", pa.array(pos[rows]))
            decoded = _decode_batch(batch, backbone.train_transform, cfg.seed, epoch)
            batches.append((epoch, {k: torch.from_numpy(v) for k, v in decoded.items()}))
    return batches


def plain_loop(cfg, batches, text_dim, text_step=None) -> tuple[list[float], list[float]]:
    """Single-process loop over in-memory batches; returns (step seconds, total losses)."""
    model, _ = build_model(cfg, text_dim)
    optimizer, scheduler = _optimizer(model, cfg, len(batches))
    phases = epoch_phases(cfg)
    times, losses = [], []
    for step, (epoch, batch) in enumerate(batches):
        tick = time.perf_counter()
        torch.manual_seed(_seed_of(cfg.seed, step, 0))  # as the Ray loop does on rank 0
        text = text_step(step) if text_step else batch["text_feature"]
        z_image, z_text = model(batch["image"], text)
        out = loss.pacl_loss(z_image, z_text, batch["partition"], batch["factual"], batch["emotional"],
                             cfg.train.temperature, phases[epoch])
        optimizer.zero_grad(set_to_none=True)
        out["total"].backward()
        optimizer.step()
        scheduler.step()
        times.append(time.perf_counter() - tick)
        losses.append(float(out["total"].detach()))
    return times, losses


def cpu_benchmarks(args) -> None:
    from pacl_ray.stages.runtime import init_ray

    workdir = Path(tempfile.mkdtemp(prefix="pacl-train-bench-"))
    outs, texts = write_world(workdir / "world", args.pairs, args.text_dim, args.image_size + 8)
    cfg = config.from_dict({
        "output_dir": str(workdir / "runs"), "seed": 0,
        "model": {"backbone": args.backbone, "backbone_pretrained": "false", "embed_dim": 64},
        "train": {"epochs": args.epochs, "schedule": "all", "global_batch_size": args.batch, "num_workers": 1,
                  "image_size": args.image_size, "lr_backbone": 1e-4, "log_every_steps": 10_000,
                  "checkpoint_every_steps": 0},
    })
    init_ray(config.RayConfig(num_cpus=args.ray_cpus))
    # Ray Train gives a 1-CPU worker one intra-op thread (OMP_NUM_THREADS=1); match it, and time the
    # plain loop before and after the Ray run (a shared machine's load drifts) and keep the faster.
    torch.set_num_threads(1)
    batches = same_batches(cfg, outs)
    plain_before, plain_losses = plain_loop(cfg, batches, args.text_dim)
    result = run_train(cfg, outs["ingest"], outs["partition"], outs["embed"], outs["cluster"])
    plain_after, _ = plain_loop(cfg, batches, args.text_dim)
    ray_rows = load_state(result.checkpoint)["step_rows"]
    assert len(batches) == len(ray_rows)

    def steady(times, epochs):  # the first step of an epoch also waits for its data pipeline
        return [t for i, t in enumerate(times) if i and epochs[i] == epochs[i - 1]]

    epochs = [e for e, _ in batches]
    ray_med = statistics.median(steady([r["step_time_s"] for r in ray_rows], epochs))
    wait_med = statistics.median(steady([r["data_wait_s"] for r in ray_rows], epochs))
    plain_med = min(statistics.median(steady(plain_before, epochs)), statistics.median(steady(plain_after, epochs)))
    ray_losses = [r["total"] for r in ray_rows]
    rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ray_losses, plain_losses))
    print(f"[1] backbone={args.backbone} {args.image_size}px global batch {args.batch}, {len(ray_rows)} steps, 1 worker (CPU, 1 thread)")
    print(f"    Ray Train step   median {ray_med * 1e3:8.1f} ms  (of which waiting for data: {wait_med * 1e3:.1f} ms)")
    print(f"    plain loop step  median {plain_med * 1e3:8.1f} ms  (before/after the Ray run: "
          f"{statistics.median(steady(plain_before, epochs)) * 1e3:.1f} / {statistics.median(steady(plain_after, epochs)) * 1e3:.1f})")
    print(f"    ratio Ray/plain  {ray_med / plain_med:.3f}   (target <= 1.10)")
    print(f"    loss trajectories: max relative difference {rel:.2e}; epoch-mean loss "
          f"{[round(h['total'], 3) for h in result.history]}")

    encoder = backbones.TextEncoder(backbones.MINILM_ID, pooling="mean", max_length=64)
    batches = batches[: args.text_steps]
    text_batches = [texts[i * args.batch:(i + 1) * args.batch] for i in range(len(batches))]
    text_batches = [t if len(t) == args.batch else texts[: args.batch] for t in text_batches]
    encode_times, _ = plain_loop(cfg, batches, encoder.dim, text_step=lambda s: encoder.encode(text_batches[s]).clone())
    cached_times, _ = plain_loop(cfg, [(e, {**b, "text_feature": torch.randn(args.batch, encoder.dim)}) for e, b in batches], encoder.dim)
    enc_med, cached_med = statistics.median(encode_times[1:]), statistics.median(cached_times[1:])
    print(f"[2] text encoder {backbones.MINILM_ID} in the step: {enc_med * 1e3:.1f} ms/step; cached features: "
          f"{cached_med * 1e3:.1f} ms/step; speed-up {enc_med / cached_med:.2f}x")


# --------------------------------------------------------------------------- GPU throughput

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "L40S": 362.0}


def gpu_peak_tflops(name: str, override: float) -> float:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return float("nan")


def gpu_throughput(backbone: str, batch: int, steps: int, warmup: int) -> tuple[float, float]:
    """(images/s, achieved TFLOP/s) of PACL training steps at 224 px in bf16 on one GPU."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = config.from_dict({"model": {"backbone": backbone, "backbone_pretrained": "false"}})
    device = torch.device("cuda")
    model, _ = build_model(cfg, text_dim=1024)
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer, _ = _optimizer(model, cfg, steps + warmup)
    images = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
    text = torch.randn(batch, 1024, device=device)
    codes = torch.randint(1, 5, (batch,), device=device)
    labels = torch.randint(0, 2, (batch,), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            z_image, z_text = model(images, text)
        out = loss.pacl_loss(z_image.float(), z_text.float(), codes, labels, labels, 0.07)
        optimizer.zero_grad(set_to_none=True)
        out["total"].backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    tick = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - tick) / steps
    return batch / seconds, flops / seconds / 1e12


def gpu_benchmarks(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name()
    peak = gpu_peak_tflops(name, args.peak_tflops)
    print(f"[3] {name}: PACL step (fwd+bwd+AdamW) at 224 px, bf16 autocast, batch {args.gpu_batch}")
    for backbone in ("resnet50", "vit_base_patch16_224"):
        images_per_s, tflops = gpu_throughput(backbone, args.gpu_batch, args.gpu_steps, warmup=5)
        print(f"    {backbone:22s} {images_per_s:8.1f} images/s/GPU   {tflops:6.1f} TFLOP/s = "
              f"{tflops / peak:.1%} of {peak:.0f} TFLOP/s bf16 dense peak")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--text-dim", type=int, default=384)
    parser.add_argument("--text-steps", type=int, default=8, help="steps timed for the text-encoder comparison")
    parser.add_argument("--ray-cpus", type=int, default=4)
    parser.add_argument("--gpu", action="store_true", help="also run the GPU throughput benchmark")
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--gpu-batch", type=int, default=128)
    parser.add_argument("--gpu-steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="override the GPU's bf16 dense peak")
    args = parser.parse_args(argv)
    if not args.skip_cpu:
        cpu_benchmarks(args)
    if args.gpu:
        gpu_benchmarks(args)


if __name__ == "__main__":
    main()
