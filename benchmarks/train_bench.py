"""Training-step benchmarks for Stage 3 (issues #5 and #21).

``--gpu`` (issue #21; plain PyTorch, no Ray and no FAISS: it needs only torch and timm): the PACL
training step (our model and loss, forward + backward + AdamW) on synthetic tensors at 224 px,
bf16 autocast, global batch ``--gpu-batch``, for ResNet-50 and ViT-B/16, as images/s per GPU and
the share of the chip's dense bf16 peak that its FLOP rate is (FLOPs counted by
``torch.utils.flop_counter``). Each backbone is measured before and after each change of issue
#21, cumulatively, in one run, side by side:

  before           -- the loop as it was: eager, NCHW, foreach AdamW, the host reading every loss
                      term and checking the batch positions every step (``.item()`` syncs);
  + channels_last  -- NHWC model and images (conv nets; a no-op row for the ViT);
  + no host sync   -- nothing read back inside the step (the training loop's ``StepLog``);
  + fused AdamW    -- ``torch.optim.AdamW(fused=True)``;
  + torch.compile  -- the model compiled (``train.compile``; the loss stays eager).

Then the PACL loss forward + backward at N = ``--loss-n`` (4096) with D = 768 on the device, against
plain CLIP InfoNCE. ``--smoke`` runs the same code on CPU at toy sizes (timm's test_resnet and test_vit at
64 px, batch 8, ``aot_eager`` compile), to show it works where no GPU is.

Without ``--gpu``/``--smoke`` (issue #5, needs Ray): the median step time of the Ray Train loop (1
worker) against a plain single-process loop on the same batches, the largest relative difference of
their loss trajectories, and the speed-up of cached text features over running the text encoder in
every step.

    python benchmarks/train_bench.py --gpu            # one H100/H200: ~3-4 min, most of it compiling
    python benchmarks/train_bench.py --smoke          # CPU, ~1-2 min
    HF_HUB_OFFLINE=1 python benchmarks/train_bench.py # the Ray comparison (CPU)
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from pacl_ray.core import loss
from pacl_ray.core.pacl_model import build_model

# Dense bf16 peak, TFLOP/s (NVIDIA data sheets, SXM parts). The H200 is the H100's chip with more
# memory; issue #21 measured ~790 TFLOP/s achievable on one (pass --peak-tflops to use that).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
TEXT_DIM = 384  # all-MiniLM-L6-v2's width (the cached text features)


# --------------------------------------------------------------------------- the step, per setting


@dataclass(frozen=True)
class Setting:
    name: str
    channels_last: bool
    host_sync: bool
    fused: bool
    compile: bool


SETTINGS = (
    Setting("before", False, True, False, False),
    Setting("+ channels_last", True, True, False, False),
    Setting("+ no host sync", True, False, False, False),
    Setting("+ fused AdamW", True, False, True, False),
    Setting("+ torch.compile", True, False, True, True),
)


def optimizer_for(model, lr_backbone: float, fused: bool) -> torch.optim.AdamW:
    """AdamW over the shipped parameter groups (``pacl_ray.stages.train_step.param_groups``: backbone
    and heads at their own rates, weight decay 0.02 with none on norms and biases); ``fused``: one
    kernel per group (CUDA)."""
    from pacl_ray.stages.train_step import param_groups

    return torch.optim.AdamW(param_groups(model, lr_backbone, 1e-3, 0.02), weight_decay=0.02,
                             fused=True if fused else None)


def make_step(backbone: str, setting: Setting, batch: int, image_size: int, device: torch.device,
              compile_backend: str):
    """A zero-argument training step of the PACL model and loss on fixed synthetic tensors."""
    model, wrapper = build_model(TEXT_DIM, backbone=backbone, pretrained="false", image_size=image_size, embed_dim=768)
    memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=memory_format)
    optimizer = optimizer_for(model, 1e-4, setting.fused and device.type == "cuda")
    forward = torch.compile(model, backend=compile_backend, dynamic=False) if setting.compile else model
    g = torch.Generator().manual_seed(0)
    # uint8 batches normalised on the device, as the training loop feeds the model (ImageNormalizer)
    from pacl_ray.stages.train_step import ImageNormalizer

    normalize = ImageNormalizer.for_backbone(wrapper, device, setting.channels_last)
    pixels = torch.randint(0, 256, (batch, 3, image_size, image_size), generator=g, dtype=torch.uint8).to(device)
    text = torch.randn(batch, TEXT_DIM, generator=g).to(device)
    codes, factual, emotional = (torch.randint(lo, hi, (batch,), generator=g).to(device)
                                 for lo, hi in ((1, 5), (0, 2), (0, 2)))
    position = torch.arange(batch, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            z_image, z_text = forward(normalize(pixels), text)
        losses = loss.pacl_loss(z_image.float(), z_text.float(), codes, factual, emotional, 0.07)
        if setting.host_sync:  # what the loop did before issue #21, every step
            if not bool((position // batch == 0).all()):
                raise RuntimeError("positions")
            if not all(map(torch.isfinite, [losses[k].detach() for k in ("L1", "L2", "L3", "L4", "total")])):
                raise RuntimeError("non-finite")
            _ = [float(losses[k].detach()) for k in ("L1", "L2", "L3", "L4", "total")]
            _ = [float((codes == k).sum()) for k in (1, 2, 3, 4)]  # partition shares
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()

    return step, model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(backbone: str, batch: int, image_size: int, device: torch.device) -> float:
    """FLOPs of one training step (forward + backward of model and loss; the optimiser's
    elementwise work is not counted), from ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    step, _ = make_step(backbone, SETTINGS[0], batch, image_size, device, "inductor")
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def images_per_s(step, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):  # includes compiling, cuDNN autotuning, allocator warm-up
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def loss_ms(n: int, dim: int, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median ms of forward + backward of pacl_loss and of clip_loss at [n, dim] on ``device``."""
    g = torch.Generator().manual_seed(0)
    zv = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1).to(device).requires_grad_(True)
    zt = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1).to(device).requires_grad_(True)
    codes = torch.randint(1, 5, (n,), generator=g).to(device)
    labels = torch.randint(0, 2, (n,), generator=g).to(device)

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    return (timed(lambda: loss.pacl_loss(zv, zt, codes, labels, labels, 0.07)["total"].backward()),
            timed(lambda: loss.clip_loss(zv, zt, 0.07).backward()))


def peak_tflops(device: torch.device, override: float) -> float:
    if override:
        return override
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))


def step_benchmarks(device: torch.device, backbones: tuple[str, ...], batch: int, image_size: int, steps: int,
                    warmup: int, compile_backend: str, loss_n: int, peak_override: float) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    peak = peak_tflops(device, peak_override)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"{name}: PACL step (forward + backward + AdamW), {image_size} px, {precision}, batch {batch}, "
          f"{steps} timed steps after {warmup}; peak {peak:.0f} TFLOP/s bf16 dense")
    print(f"{'backbone':>22} {'setting':>16} {'images/s':>10} {'TFLOP/s':>8} {'% peak':>7} {'vs before':>9}")
    for backbone in backbones:
        flops = step_flops(backbone, batch, image_size, device)
        before = None
        for setting in SETTINGS:
            step, model = make_step(backbone, setting, batch, image_size, device, compile_backend)
            rate = images_per_s(step, batch, steps, warmup, device)
            before = before or rate
            tflops = flops * rate / batch / 1e12
            print(f"{backbone:>22} {setting.name:>16} {rate:10.1f} {tflops:8.1f} {tflops / peak:7.1%} "
                  f"{rate / before:8.2f}x", flush=True)
            del step, model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        torch._dynamo.reset()
    pacl, clip = loss_ms(loss_n, 768, device, repeats=10)
    print(f"loss forward + backward at N={loss_n}, D=768 on {device.type}: PACL {pacl:.2f} ms, CLIP InfoNCE "
          f"{clip:.2f} ms, ratio {pacl / clip:.2f}")


# --------------------------------------------------------------------------- Ray Train vs plain loop (CPU)


def cpu_benchmarks(args) -> None:
    """Issue #5: the Ray Train loop against a plain loop on the same batches; cached text features."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from pacl_ray import config
    from pacl_ray.config import model_args
    from pacl_ray.core import backbones
    from pacl_ray.stages.runtime import init_ray
    from pacl_ray.stages.checkpoint import load_state
    from pacl_ray.stages.train import run_train
    from pacl_ray.stages.train_data import (
        epoch_phases, feed_order, joined_table, load_training_table, rank_batches, seed_of,
    )
    from pacl_ray.stages.train_step import ImageNormalizer, build_optimizer
    from pacl_ray.world import stage_tables

    words = "happy sad calm angry bright dark storm beach dog city night joy fear love gloomy sunny".split()
    workdir = Path(tempfile.mkdtemp(prefix="pacl-train-bench-"))
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 20)) for _ in range(args.pairs)]
    outs = stage_tables.write_stage_tables(workdir / "world", rng.integers(1, 5, args.pairs), args.text_dim, seed=0,
                                           image_px=args.image_size + 8, image_format="JPEG", texts=texts)
    cfg = config.from_dict({
        "output_dir": str(workdir / "runs"), "seed": 0,
        "model": {"backbone": args.backbone, "backbone_pretrained": "false", "embed_dim": 64},
        "train": {"epochs": args.epochs, "schedule": "all", "global_batch_size": args.batch, "num_workers": 1,
                  "image_size": args.image_size, "lr_backbone": 1e-4, "log_every_steps": 10_000,
                  "checkpoint_every_steps": 0},
    })
    init_ray(config.RayConfig(num_cpus=args.ray_cpus))
    # Ray Train gives a 1-CPU worker one intra-op thread; match it, and time the plain loop before
    # and after the Ray run (a shared machine's load drifts) and keep the faster.
    torch.set_num_threads(1)
    meta = load_training_table(outs["ingest"], outs["partition"], outs["embed"], outs["cluster"], cfg.train.k)
    table = joined_table(outs["ingest"], meta)
    codes = meta.column("partition").to_numpy()
    _, backbone = build_model(args.text_dim, **model_args(cfg))
    B, batches = cfg.train.global_batch_size, []
    order = feed_order(codes, B, cfg.seed, cfg.train.feed_shards)
    normalize = ImageNormalizer.for_backbone(backbone, torch.device("cpu"))  # uint8 batches -> model input
    for epoch, phase in enumerate(epoch_phases(cfg)):
        for batch in rank_batches(table, order, phase, epoch, 0, 0, 1, backbone.train_transform,
                                  torch.device("cpu")):
            batches.append((epoch, batch))

    def plain_loop(text_step=None, text_dim=args.text_dim) -> tuple[list[float], list[float]]:
        model, _ = build_model(text_dim, **model_args(cfg))
        optimizer, scheduler = build_optimizer(model, cfg, len(batches))
        phases = epoch_phases(cfg)
        times, totals = [], []
        for step, (epoch, batch) in enumerate(batches):
            tick = time.perf_counter()
            torch.manual_seed(seed_of(cfg.seed, step, 0))  # as the Ray loop does on rank 0
            text = text_step(step) if text_step else batch["text_feature"]
            z_image, z_text = model(normalize(batch["image"]), text)
            out = loss.pacl_loss(z_image, z_text, batch["partition"], batch["factual_pseudo_label"],
                                 batch["emotional_pseudo_label"], cfg.train.temperature, phases[epoch])
            optimizer.zero_grad(set_to_none=True)
            out["total"].backward()
            optimizer.step()
            scheduler.step()
            times.append(time.perf_counter() - tick)
            totals.append(float(out["total"].detach()))
        return times, totals

    plain_before, plain_losses = plain_loop()
    result = run_train(cfg, outs["ingest"], outs["partition"], outs["embed"], outs["cluster"])
    plain_after, _ = plain_loop()
    ray_rows = load_state(result.checkpoint)["step_rows"]
    assert len(batches) == len(ray_rows)

    def steady(times, epochs):  # the first step of an epoch also waits for its data
        return [t for i, t in enumerate(times) if i and epochs[i] == epochs[i - 1]]

    epochs = [e for e, _ in batches]
    ray_med = statistics.median(steady([r["step_time_s"] for r in ray_rows], epochs))
    wait_med = statistics.median(steady([r["data_wait_s"] for r in ray_rows], epochs))
    before, after = statistics.median(steady(plain_before, epochs)), statistics.median(steady(plain_after, epochs))
    rel = max(abs(r["total"] - b) / max(abs(b), 1e-12) for r, b in zip(ray_rows, plain_losses))
    print(f"[1] backbone={args.backbone} {args.image_size}px global batch {args.batch}, {len(ray_rows)} steps, "
          f"1 worker (CPU, 1 thread)")
    print(f"    Ray Train step   median {ray_med * 1e3:8.1f} ms  (of which waiting for data: {wait_med * 1e3:.1f} ms)")
    print(f"    plain loop step  median {min(before, after) * 1e3:8.1f} ms  (before/after the Ray run: "
          f"{before * 1e3:.1f} / {after * 1e3:.1f})")
    print(f"    ratio Ray/plain  {ray_med / min(before, after):.3f}   (target <= 1.10)")
    print(f"    loss trajectories: max relative difference {rel:.2e}; first step after "
          f"{result.final_metrics.get('start_to_first_step_s', float('nan')):.1f} s")

    encoder = backbones.TextEncoder(backbones.MINILM_ID, pooling="mean", max_length=64)
    batches = batches[: args.text_steps]
    text_batches = [texts[i * args.batch:(i + 1) * args.batch] for i in range(len(batches))]
    text_batches = [t if len(t) == args.batch else texts[: args.batch] for t in text_batches]
    encode_times, _ = plain_loop(lambda s: encoder.encode(text_batches[s]).clone(), encoder.dim)
    cached_times, _ = plain_loop(lambda s: torch.randn(args.batch, encoder.dim), encoder.dim)
    enc_med, cached_med = statistics.median(encode_times[1:]), statistics.median(cached_times[1:])
    print(f"[2] text encoder {backbones.MINILM_ID} in the step: {enc_med * 1e3:.1f} ms/step; cached features: "
          f"{cached_med * 1e3:.1f} ms/step; speed-up {enc_med / cached_med:.2f}x")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU step benchmark (issue #21) on cuda:0")
    parser.add_argument("--smoke", action="store_true", help="the same step benchmark on CPU at toy sizes")
    parser.add_argument("--gpu-batch", type=int, default=256)
    parser.add_argument("--gpu-steps", type=int, default=20)
    parser.add_argument("--loss-n", type=int, default=4096)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="override the GPU's bf16 dense peak")
    parser.add_argument("--backbone", default="resnet18", help="Ray comparison: backbone")
    parser.add_argument("--image-size", type=int, default=64, help="Ray comparison: image size (px)")
    parser.add_argument("--batch", type=int, default=32, help="Ray comparison: global batch")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--text-dim", type=int, default=384)
    parser.add_argument("--text-steps", type=int, default=8, help="steps timed for the text-encoder comparison")
    parser.add_argument("--ray-cpus", type=int, default=4)
    args = parser.parse_args(argv)
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu: no CUDA device")
        step_benchmarks(torch.device("cuda"), ("resnet50", "vit_base_patch16_224"), args.gpu_batch, 224,
                        args.gpu_steps, warmup=5, compile_backend="inductor", loss_n=args.loss_n,
                        peak_override=args.peak_tflops)
    elif args.smoke:
        step_benchmarks(torch.device("cpu"), ("test_resnet", "test_vit"), 8, 64, steps=2, warmup=1,
                        compile_backend="aot_eager", loss_n=512, peak_override=args.peak_tflops)
    else:
        cpu_benchmarks(args)


if __name__ == "__main__":
    main()
