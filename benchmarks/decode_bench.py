"""Decode + train-transform throughput per CPU core (issue #21): what feeding one GPU costs.

For generated photo-like JPEGs of several sizes it times, on one core, the work a training
worker does per image: decode the stored bytes with the package's decoder
(:func:`pacl_ray.formats.images.decode_rgb`) and apply the package's train transform
(:func:`pacl_ray.core.pacl_model.train_transform` at 224 px with ``train.*``'s defaults:
random-resized crop of 50-100% of the area, flip, no colour jitter; ``--crop-scale-low`` and
``--color-jitter`` change them). Variants, side by side:

* ``original``  -- the image as ingested by default, full decode (the baseline: what the package
  did before issue #21);
* ``draft``     -- the same bytes, decoded as training now decodes them: Pillow's JPEG draft mode
  (DCT scaling by 1/2, 1/4, 1/8) down to the shorter side the crop needs
  (:func:`pacl_ray.formats.images.min_side_for`: 366 px for 224 px at crop scale >= 0.5);
* ``resized``   -- stored by ingest with ``ingest.max_image_side`` = ``--max-side``
  (:func:`pacl_ray.formats.images.store`: draft + Lanczos, JPEG at quality 95), full decode;
* ``resized+draft`` -- both, as shipped with ``ingest.max_image_side`` set;
* ``rs+draft+1pass+u8`` -- a prototype, NOT in the package: as the previous one with the
  random-resized crop done by one Pillow resize call (:class:`OnePassResizedCrop`) and the
  transform stopping at a uint8 tensor (timm's ``use_prefetcher`` form: normalisation on the GPU).

Times are process CPU seconds (``time.process_time``), not wall time, so a busy shared machine
does not inflate them much; images/s per core is their inverse. The last table gives the cores
one GPU needs at the step rates measured on an H100 (issue #21: ResNet-50 3,486 images/s,
ViT-B/16 2,351 images/s).

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


def bench_transform(size: int, crop_scale_low: float, color_jitter: float, prototype: bool = False):
    """The package's train transform (``pacl_model.train_transform``, ImageNet normalisation,
    bicubic); ``prototype``: with :class:`OnePassResizedCrop` and a uint8 tensor output instead of
    the normalised float one (not in the package)."""
    defaults = TrainConfig()
    transform = train_transform(size, IMAGENET_MEAN, IMAGENET_STD, "bicubic", (crop_scale_low, 1.0),
                                defaults.hflip, color_jitter)
    if prototype:
        from torchvision.transforms import PILToTensor

        steps = [OnePassResizedCrop(transform.transforms[0])] + transform.transforms[1:]
        tail = [i for i, t in enumerate(steps) if type(t).__name__ in ("MaybeToTensor", "ToTensor")][0]
        transform.transforms = steps[:tail] + [PILToTensor()]  # normalisation moves to the device
    return transform


class OnePassResizedCrop:
    """timm's ``RandomResizedCropAndInterpolation`` (same parameters and random draws) with the
    crop and the resample done by one ``PIL.Image.resize(box=..., reducing_gap=2.0)``."""

    def __init__(self, rrc):
        self.rrc = rrc
        self.size = tuple(rrc.size)[::-1]  # PIL takes (width, height)

    def __call__(self, img: Image.Image) -> Image.Image:
        top, left, height, width = self.rrc.get_params(img, self.rrc.scale, self.rrc.ratio)
        resample = Image.BICUBIC
        return img.resize(self.size, resample, box=(left, top, left + width, top + height), reducing_gap=2.0)


@dataclass(frozen=True)
class Variant:
    name: str
    stored: str  # "original" | "resized"
    draft: bool  # decode at reduced scale down to the transform's min_side_for
    prototype: bool = False


VARIANTS = [
    Variant("original", "original", False),
    Variant("draft", "original", True),
    Variant("resized", "resized", False),
    Variant("resized+draft", "resized", True),
    Variant("rs+draft+1pass+u8", "resized", True, True),
]


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
    parser.add_argument("--max-side", type=int, default=512, help="ingest.max_image_side of the resized variants")
    parser.add_argument("--crop-scale-low", type=float, default=TrainConfig().crop_scale[0],
                        help="train.crop_scale[0] (timm's default is 0.08)")
    parser.add_argument("--color-jitter", type=float, default=TrainConfig().color_jitter, help="train.color_jitter")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core: the transform's tensor ops stay on this thread

    transforms = {p: bench_transform(args.image_size, args.crop_scale_low, args.color_jitter, p) for p in (False, True)}
    min_side = images.min_side_for(transforms[False])
    print(f"decode (pacl_ray.formats.images) + the package's train transform at {args.image_size} px (crop scale "
          f">= {args.crop_scale_low}, colour jitter {args.color_jitter}), one core (process CPU time, median of "
          f"{args.repeats} passes over {args.images} generated JPEGs per size); resized = ingest.max_image_side "
          f"{args.max_side}, draft = shorter side >= {min_side} (min_side_for); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    head = f"{'image':>10} {'KB':>6} {'KB rs':>6} | " + " | ".join(f"{v.name:>22}" for v in VARIANTS)
    print(head + "\n" + "-" * len(head))
    results: dict[tuple[str, str], float] = {}
    for size in args.sizes:
        width, height = (int(v) for v in size.lower().split("x"))
        originals = [jpeg_bytes(photo_like(width, height, seed)) for seed in range(args.images)]
        stored = {"original": originals,
                  "resized": [images.store(d, max_side=args.max_side).data for d in originals]}
        cells = []
        for v in VARIANTS:
            seconds = cpu_seconds_per_image(stored[v.stored], min_side if v.draft else None,
                                            transforms[v.prototype], args.repeats)
            results[size, v.name] = seconds
            speedup = results[size, VARIANTS[0].name] / seconds
            cells.append(f"{seconds * 1e3:6.2f} ms {1 / seconds:6.0f}/s {speedup:4.1f}x")
        kb = statistics.mean(map(len, originals)) / 1024
        kb_rs = statistics.mean(map(len, stored["resized"])) / 1024
        print(f"{size:>10} {kb:6.0f} {kb_rs:6.0f} | " + " | ".join(f"{c:>22}" for c in cells))

    print("\ncores per GPU for decode + transform alone (images/s per core -> cores at the H100 step rate)")
    head = f"{'image':>10} {'variant':>18} {'img/s/core':>11} " + " ".join(f"{k:>10}" for k in GPU_STEP_RATES)
    print(head + "\n" + "-" * len(head))
    for size in args.sizes:
        for v in VARIANTS:
            rate = 1 / results[size, v.name]
            cores = " ".join(f"{r / rate:10.1f}" for r in GPU_STEP_RATES.values())
            print(f"{size:>10} {v.name:>18} {rate:11.0f} {cores}")


if __name__ == "__main__":
    main()
