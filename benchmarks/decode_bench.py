"""Decode + train-transform throughput per CPU core (issue #21): what feeding one GPU costs.

For generated photo-like JPEGs of several sizes it times, on one core, the work a training
worker does per image: decode the stored bytes with the package's decoder
(:func:`pacl_ray.formats.images.decode_rgb`) and apply a train transform at 224 px with
``train.*``'s defaults (random-resized crop of 50-100% of the area, flip, no colour jitter;
``--crop-scale-low`` and ``--color-jitter`` change them). Variants, side by side:

* ``before #21`` -- the old path, for comparison (NOT what the package does now): the image as
  ingested by default, full decode, timm's train transform as the package built it before
  issue #21 (crop copy + resize, ``ToTensor`` to float, ``Normalize`` on the CPU);
* ``draft``      -- shipped: the same bytes decoded with Pillow's JPEG draft mode (DCT scaling by
  1/2, 1/4, 1/8) down to the shorter side the crop needs
  (:func:`pacl_ray.formats.images.min_side_for`: 366 px for 224 px at crop scale >= 0.5), and the
  package's train transform (:func:`pacl_ray.core.pacl_model.train_transform`: one-pass
  crop + resize, uint8 tensor out; the float conversion and normalisation run on the training
  device, :class:`pacl_ray.stages.train_step.ImageNormalizer`, and are not counted here);
* ``stored N``   -- shipped with ``ingest.max_image_side`` = N (``--max-sides``; stored by
  :func:`pacl_ray.formats.images.store`: draft + Lanczos, JPEG at quality 95), then as ``draft``.

Times are process CPU seconds (``time.process_time``), not wall time, so a busy shared machine
does not inflate them much (it still does some: caches and cores are shared); images/s per core
is their inverse. Speed-ups are given against ``before #21`` measured in the same run and against
issue #21's figure for today's path, 129 images/s per core (600x600, 170 KB, a quieter machine).
The last table gives the cores one GPU needs at the step rates measured on an H100 (issue #21:
ResNet-50 3,486 images/s, ViT-B/16 2,351 images/s).

    python benchmarks/decode_bench.py                       # the default sizes, ~1 min
    python benchmarks/decode_bench.py --sizes 600x600 --images 8 --repeats 2   # smoke
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from anywhere

from pacl_ray.config import TrainConfig  # noqa: E402
from pacl_ray.core.pacl_model import train_transform  # noqa: E402
from pacl_ray.formats import images  # noqa: E402

GPU_STEP_RATES = {"ResNet-50": 3486.0, "ViT-B/16": 2351.0}  # images/s per H100 (issue #21)
TODAY_PER_CORE = 129.0  # issue #21: 600x600 170 KB JPEG, full decode + timm's train transform at 224 px
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- images


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: smooth colour fields at several scales (sky, objects, shading),
    a few sharp-edged shapes and sensor-like fine grain, so the JPEG's size and decode cost are
    close to a real photo's (a 600x600 one encodes to ~150-200 KB at quality 90)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((3, 90.0), (12, 40.0), (48, 20.0)):
        low = rng.normal(0, 1, (cells, max(2, cells * width // height), 3)).astype(np.float32)
        field = Image.fromarray(((low - low.min()) / (np.ptp(low) + 1e-6) * 255).astype(np.uint8))
        out += (np.asarray(field.resize((width, height), Image.BICUBIC), np.float32) / 255 - 0.5) * amplitude
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(12):  # sharp edges: discs and bars
        side = min(width, height)
        cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(side // 20, side // 4)
        out[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += rng.normal(0, 40, 3)
    out += rng.normal(0, 14.0, out.shape)  # grain
    return Image.fromarray(np.clip(out + 128, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --------------------------------------------------------------------------- decoding


def before_transform(size: int, crop_scale_low: float, color_jitter: float):
    """The train transform as the package built it before issue #21: timm's
    ``create_transform(is_training=True)`` with ImageNet normalisation, i.e. timm's own
    ``RandomResizedCropAndInterpolation`` (crop copy, then resize), flip, ``ToTensor`` to float32,
    ``Normalize`` on the CPU."""
    defaults = TrainConfig()
    transform = train_transform(size, "bicubic", (crop_scale_low, 1.0), defaults.hflip, color_jitter,
                                normalize=(IMAGENET_MEAN, IMAGENET_STD))
    transform.transforms[0] = transform.transforms[0].crop  # timm's crop in place of the one-pass one
    return transform


def shipped_transform(size: int, crop_scale_low: float, color_jitter: float):
    """The package's train transform (:func:`pacl_ray.core.pacl_model.train_transform`): uint8 out."""
    defaults = TrainConfig()
    return train_transform(size, "bicubic", (crop_scale_low, 1.0), defaults.hflip, color_jitter)


@dataclass(frozen=True)
class Variant:
    name: str
    max_side: int  # ingest.max_image_side the bytes were stored with; 0: as given
    shipped: bool  # draft decoding + the package's transform; False: the path before issue #21


def cpu_seconds_per_image(stored: list[bytes], min_side: Optional[int], transform, repeats: int) -> float:
    """Median over ``repeats`` passes of the process CPU time per image of decode + transform."""
    for data in stored[:2]:  # warm-up (imports, first-call allocations)
        transform(images.decode_rgb(data, min_side=min_side))
    passes = []
    for _ in range(repeats):
        start = time.process_time()
        for data in stored:
            transform(images.decode_rgb(data, min_side=min_side))
        passes.append((time.process_time() - start) / len(stored))
    return statistics.median(passes)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["600x600", "1200x900", "3000x2000"])
    parser.add_argument("--images", type=int, default=16, help="distinct generated images per size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224, help="train transform output size (px)")
    parser.add_argument("--max-sides", type=int, nargs="+", default=[512, 384],
                        help="ingest.max_image_side of the stored variants")
    parser.add_argument("--crop-scale-low", type=float, default=TrainConfig().crop_scale[0],
                        help="train.crop_scale[0] (timm's default is 0.08)")
    parser.add_argument("--color-jitter", type=float, default=TrainConfig().color_jitter, help="train.color_jitter")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core: the transform's tensor ops stay on this thread

    variants = ([Variant("before #21", 0, False), Variant("draft", 0, True)]
                + [Variant(f"stored {side}", side, True) for side in args.max_sides])
    transforms = {False: before_transform(args.image_size, args.crop_scale_low, args.color_jitter),
                  True: shipped_transform(args.image_size, args.crop_scale_low, args.color_jitter)}
    min_side = images.min_side_for(transforms[True])
    print(f"decode (pacl_ray.formats.images) + train transform at {args.image_size} px (crop scale >= "
          f"{args.crop_scale_low}, colour jitter {args.color_jitter}), one core (process CPU time, median of "
          f"{args.repeats} passes over {args.images} generated JPEGs per size); 'before #21' = full decode + timm's "
          f"float transform (the old path); the others as shipped: draft decode to shorter side >= {min_side} "
          f"(min_side_for) + the package's uint8 transform (normalised on the device); 'stored N' = "
          f"ingest.max_image_side N; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    head = f"{'image':>10} {'KB':>5} | " + " | ".join(f"{v.name + ' (KB)':>30}" for v in variants)
    print(head + "\n" + "-" * len(head))
    results: dict[tuple[str, str], float] = {}
    for size in args.sizes:
        width, height = (int(v) for v in size.lower().split("x"))
        originals = [jpeg_bytes(photo_like(width, height, seed)) for seed in range(args.images)]
        stored = {0: originals, **{side: [images.store(d, max_side=side).data for d in originals]
                                   for side in args.max_sides}}
        cells = []
        for v in variants:
            seconds = cpu_seconds_per_image(stored[v.max_side], min_side if v.shipped else None,
                                            transforms[v.shipped], args.repeats)
            results[size, v.name] = seconds
            kb = statistics.mean(map(len, stored[v.max_side])) / 1024
            cells.append(f"{seconds * 1e3:6.2f} ms {1 / seconds:5.0f}/s ({kb:4.0f})")
        print(f"{size:>10} {statistics.mean(map(len, originals)) / 1024:5.0f} | "
              + " | ".join(f"{c:>30}" for c in cells))

    print(f"\nimages/s per core, speed-up vs 'before #21' in this run and vs issue #21's {TODAY_PER_CORE:.0f}/s "
          f"(target: 3x, {3 * TODAY_PER_CORE:.0f}/s), cores per GPU at the H100 step rate")
    head = (f"{'image':>10} {'variant':>12} {'img/s/core':>11} {'vs before':>10} {'vs 129/s':>9} "
            + " ".join(f"{k:>10}" for k in GPU_STEP_RATES))
    print(head + "\n" + "-" * len(head))
    for size in args.sizes:
        before = 1 / results[size, variants[0].name]
        for v in variants:
            rate = 1 / results[size, v.name]
            cores = " ".join(f"{r / rate:10.1f}" for r in GPU_STEP_RATES.values())
            print(f"{size:>10} {v.name:>12} {rate:11.0f} {rate / before:9.2f}x {rate / TODAY_PER_CORE:8.2f}x {cores}")


if __name__ == "__main__":
    main()
