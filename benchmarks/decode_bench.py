"""Decode + train-transform throughput per CPU core (issue #21): what feeding one GPU costs.

For generated photo-like JPEGs of several sizes it times, on one core, the work a training
worker does per image: decode the stored bytes and apply timm's train transform at 224 px
(random-resized crop 0.08-1, flip, colour jitter 0.4, bicubic) -- the transform
``pacl_ray.core.pacl_model`` builds for a timm backbone. Variants, side by side:

* ``original``  -- today: the image as ingested, full decode, transform to a normalised float
  tensor (the baseline);
* ``resized``   -- stored resized to a maximum side (``--max-side``, as ``ingest.max_image_side``
  and img2dataset do), full decode;
* ``draft``     -- the original bytes, decoded at reduced scale with Pillow's JPEG draft mode
  (libjpeg's DCT scaling by 1/2, 1/4, 1/8), never below what the crop needs (``--draft-side``
  on the shorter side);
* ``resized+draft`` -- both;
* ``rs+draft+1pass+u8`` -- both, the random-resized crop as one Pillow resize call
  (:class:`OnePassResizedCrop`), and the transform stopping at a uint8 tensor (timm's
  ``use_prefetcher`` form: normalisation moves to the GPU, one fused kernel on the batch, and the
  host-to-device copy is 4x smaller);
* ``...+jitter on GPU`` -- as the previous one with the colour jitter also left to the GPU (per-image
  factors drawn on the host from the same seeded generators, applied to the uint8 batch on the
  device): the host does decode, crop, flip only.

Times are process CPU seconds (``time.process_time``), not wall time, so a busy shared machine
does not inflate them; images/s per core is their inverse. The last columns give the cores one
GPU needs at the step rates measured on an H100 (issue #21: ResNet-50 3,486 images/s, ViT-B/16
2,351 images/s).

    python benchmarks/decode_bench.py                       # the default sizes, ~1 min
    python benchmarks/decode_bench.py --sizes 600x600 --images 8 --repeats 2   # smoke

Decoding is :func:`open_rgb` below: Pillow with draft mode; the project's single image decoder
(:mod:`pacl_ray.formats.images`, EXIF orientation and mode handling) takes the same ``min_side``
argument, and this benchmark's :func:`open_rgb` is the reference for it.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

GPU_STEP_RATES = {"ResNet-50": 3486.0, "ViT-B/16": 2351.0}  # images/s per H100 (issue #21)


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


def resized_bytes(data: bytes, max_side: int, quality: int = 90) -> bytes:
    """What ingest stores with ``max_image_side``: the longer side at most ``max_side``, the
    aspect ratio kept, re-encoded as JPEG (unchanged when already small enough)."""
    with Image.open(io.BytesIO(data)) as img:
        if max(img.size) <= max_side:
            return data
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img.draft("RGB", size)  # decode at the largest DCT scale that stays >= size
        return jpeg_bytes(img.convert("RGB").resize(size, Image.BICUBIC, reducing_gap=3.0), quality)


# --------------------------------------------------------------------------- decoding


def open_rgb(data: bytes, min_side: Optional[int] = None) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image.

    ``min_side``: for JPEGs, decode at the smallest of libjpeg's DCT scales (1, 1/2, 1/4, 1/8)
    whose shorter side stays >= ``min_side`` (Pillow's draft mode); other formats decode in full.
    """
    img = Image.open(io.BytesIO(data))
    if min_side and img.format == "JPEG" and min(img.size) > min_side:
        scale = min_side / min(img.size)
        img.draft("RGB", (int(np.ceil(img.width * scale)), int(np.ceil(img.height * scale))))
    return img.convert("RGB")


def train_transform(size: int, uint8: bool, one_pass_crop: bool = False, device_jitter: bool = False):
    """timm's train transform at ``size`` px as the PACL model builds it for a timm backbone.

    ``uint8``: stop at a uint8 CHW tensor (timm ``use_prefetcher``; normalise on the device).
    ``one_pass_crop``: the random-resized crop as one Pillow ``resize(box=..., reducing_gap=2)``
    call (crop and resample in one pass, a box-filter pre-reduction for large downscales) instead
    of a crop then a full bicubic resample; same crop distribution (timm's ``get_params``)."""
    from timm.data import create_transform

    transform = create_transform(size, is_training=True, scale=(0.08, 1.0), hflip=0.5, color_jitter=0.4,
                                 interpolation="bicubic", use_prefetcher=uint8)
    if one_pass_crop:
        transform.transforms[0] = OnePassResizedCrop(transform.transforms[0])
    if device_jitter:  # the host keeps crop, flip and the uint8 conversion; jitter runs batched on the GPU
        transform.transforms = [t for t in transform.transforms if type(t).__name__ != "ColorJitter"]
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
    min_side: Optional[int]
    uint8: bool
    one_pass_crop: bool = False
    device_jitter: bool = False  # colour jitter (and normalisation) left to the device


def variants(draft_side: int) -> list[Variant]:
    return [
        Variant("original", "original", None, False),
        Variant("draft", "original", draft_side, False),
        Variant("resized", "resized", None, False),
        Variant("resized+draft", "resized", draft_side, False),
        Variant("rs+draft+1pass+u8", "resized", draft_side, True, True),
        Variant("...+jitter on GPU", "resized", draft_side, True, True, True),
    ]


def cpu_seconds_per_image(images: list[bytes], decode: Callable, transform, repeats: int) -> float:
    """Median over ``repeats`` passes of the process CPU time per image of decode + transform."""
    for data in images[:2]:  # warm-up (imports, first-call allocations)
        transform(decode(data))
    passes = []
    for _ in range(repeats):
        start = time.process_time()
        for data in images:
            transform(decode(data))
        passes.append((time.process_time() - start) / len(images))
    return statistics.median(passes)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["600x600", "1200x900", "3000x2000"])
    parser.add_argument("--images", type=int, default=16, help="distinct generated images per size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224, help="train transform output size (px)")
    parser.add_argument("--max-side", type=int, default=512, help="stored maximum side of the resized variant")
    parser.add_argument("--draft-side", type=int, default=256,
                        help="draft decoding keeps the shorter side >= this (px)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core: the transform's tensor ops stay on this thread

    chosen = variants(args.draft_side)
    transforms = {(v.uint8, v.one_pass_crop, v.device_jitter): train_transform(
        args.image_size, v.uint8, v.one_pass_crop, v.device_jitter) for v in chosen}
    print(f"decode + timm train transform at {args.image_size} px, one core (process CPU time, median of "
          f"{args.repeats} passes over {args.images} generated JPEGs per size); resized = max side "
          f"{args.max_side}, draft = shorter side >= {args.draft_side}")
    head = f"{'image':>10} {'KB':>6} {'KB rs':>6} | " + " | ".join(f"{v.name:>22}" for v in chosen)
    print(head + "\n" + "-" * len(head))
    results: dict[tuple[str, str], float] = {}
    for size in args.sizes:
        width, height = (int(v) for v in size.lower().split("x"))
        originals = [jpeg_bytes(photo_like(width, height, seed)) for seed in range(args.images)]
        stored = {"original": originals, "resized": [resized_bytes(d, args.max_side) for d in originals]}
        cells = []
        for v in chosen:
            seconds = cpu_seconds_per_image(stored[v.stored], lambda d, m=v.min_side: open_rgb(d, m),
                                            transforms[v.uint8, v.one_pass_crop, v.device_jitter], args.repeats)
            results[size, v.name] = seconds
            speedup = results[size, chosen[0].name] / seconds
            cells.append(f"{seconds * 1e3:6.2f} ms {1 / seconds:6.0f}/s {speedup:4.1f}x")
        kb = statistics.mean(map(len, originals)) / 1024
        kb_rs = statistics.mean(map(len, stored["resized"])) / 1024
        print(f"{size:>10} {kb:6.0f} {kb_rs:6.0f} | " + " | ".join(f"{c:>22}" for c in cells))

    print("\ncores per GPU for decode + transform alone (images/s per core -> cores at the H100 step rate)")
    head = f"{'image':>10} {'variant':>18} {'img/s/core':>11} " + " ".join(f"{k:>10}" for k in GPU_STEP_RATES)
    print(head + "\n" + "-" * len(head))
    for size in args.sizes:
        for v in chosen:
            rate = 1 / results[size, v.name]
            cores = " ".join(f"{r / rate:10.1f}" for r in GPU_STEP_RATES.values())
            print(f"{size:>10} {v.name:>18} {rate:11.0f} {cores}")


if __name__ == "__main__":
    main()
