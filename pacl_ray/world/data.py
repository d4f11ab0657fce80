"""The embedded world's data: objects and emotions, rendering (the chiral arc texture that carries
emotion), noisy captions with planted partitions, ANPs, and the files a world is written as
(training manifest, clean split for the stand-ins, ImageFolder downstream set, ANP vocabulary).
See :mod:`pacl_ray.world.build` for the whole design."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pacl_ray.core.partitions import PARTITION_CODES

WORLD_VERSION = "6"  # bump when a change alters what a seed generates; 6: emotion partly follows content
IMAGE_SIZE = 32
# the emotion texture, in pixels of the 32 px image
ARC_SPACING = 9.0
ARC_RADIUS = (3.5, 4.5)
ARC_WIDTH = 2.0
ARC_CONTRAST = (45.0, 65.0)
OBJECT_RADIUS = (0.28, 0.38)  # of the image side
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


# Emotion partly follows scene content, as in real photos (amusement with animals and children, fear
# with dark scenes): each emotion has two typical objects, and with probability CONTENT_LINK a
# sample's object is one of its emotion's typical pair (either, equally likely) instead of any of
# the eight. An object-level backbone then already predicts emotion above chance, as ImageNet
# features do on FI, without seeing the texture that only captions can teach. The best emotion
# accuracy from the object alone is (1 + 3 * CONTENT_LINK) / 4 (the object's typical emotion):
# 0.55 at 0.4, against 0.25 from nothing and about 0.95 with the texture too.
TYPICAL_OBJECTS: dict[str, tuple[str, str]] = {
    "joy": ("ball", "star"),
    "calm": ("ring", "moon"),
    "sadness": ("box", "diamond"),
    "anger": ("cross", "triangle"),
}
CONTENT_LINK = 0.4


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


def draw_object(rng: np.random.Generator, emotion: str, link: float = CONTENT_LINK) -> str:
    """The object of a sample with ``emotion``: one of the emotion's TYPICAL_OBJECTS with
    probability ``link`` (in [0, 1]), else any of OBJECTS uniformly (the typical pair included).
    Always draws the same number of random values, whatever ``link`` is."""
    if not 0.0 <= link <= 1.0:
        raise ValueError(f"content link {link!r} is not a probability in [0, 1]")
    typical = rng.random() < link
    typical_object = TYPICAL_OBJECTS[emotion][int(rng.integers(2))]
    any_object = list(OBJECTS)[int(rng.integers(len(OBJECTS)))]
    return typical_object if typical else any_object


def random_samples(rng: np.random.Generator, n: int, link: float = CONTENT_LINK) -> list[Sample]:
    """``n`` samples: emotion uniform, object by :func:`draw_object` (independent of the emotion
    when ``link`` is 0)."""
    emotions = list(EMOTIONS)
    samples = []
    for _ in range(n):
        emotion = emotions[int(rng.integers(len(emotions)))]
        samples.append(Sample(draw_object(rng, emotion, link), emotion))
    return samples


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
    return {str(c): round(100.0 * float(np.mean(codes == c)), 2) for c in PARTITION_CODES}


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
    for split, lo, hi in (("train", 0.0, 0.7), ("val", 0.7, 0.85), ("test", 0.85, 1.0)):
        part = rng.permutation(labels[int(lo * n): int(hi * n)])
        for i, label in enumerate(part):
            sample = Sample(draw_object(rng, emotions[label]), emotions[label])
            _save_png(render(rng, sample), root / "downstream" / split / sample.emotion / f"{split}-{i:05d}.png")
        counts[split] = int(len(part))
    return counts


def write_anp_vocab(path: Path) -> None:
    lines = ["# ANP vocabulary of the pacl_ray embedded world: emotion adjective x object noun"]
    path.write_text("\n".join(lines + anp_vocabulary()) + "\n", encoding="utf-8")
