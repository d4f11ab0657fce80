"""Typed configuration: one dataclass per stage, loaded from YAML, overridden with dotted keys.

This is the only place that parses configuration: YAML files, ``--set`` overrides and sweep-space
values are all layered and validated here (:func:`layer_config`). Every stage receives the
resolved :class:`RunConfig` and saves it beside its outputs (see :func:`save_config`).

    cfg = load_config("configs/my.yaml", ["train.epochs=30", "partition.sigma=0.5"])

Every field declares, next to its definition, its default, a one-line meaning (paper section or
SPEC choice) and, where it has one, its domain (named choices or a numeric range). Unknown keys,
values of the wrong type and values outside their domain raise :class:`ConfigError` naming the
dotted key, the value and what is allowed: an unknown key with its close matches and the valid
keys of its section, a wrongly typed value with the syntax that works (``e.g. --set
cluster.ks=[2,3]``), and both with the config file or ``--set`` that wrote them.
``pacl-ray config`` prints every key (:func:`describe_fields`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from pacl_ray.core.partitions import CALIBRATIONS, USE_SCORES
from pacl_ray.formats import storage


class ConfigError(ValueError):
    """A configuration key is unknown, or its value has the wrong type or is outside its domain."""


# --------------------------------------------------------------------------- domains


@dataclass(frozen=True)
class Domain:
    """The values a field allows: named ``choices``, or a numeric interval.

    ``separator`` allows several choices joined by it (``"linear,finetune"``). For list fields the
    domain applies to every item (and ``length`` to the list); for mapping fields, to every value.
    """

    choices: tuple = ()
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    separator: str = ""
    length: Optional[int] = None
    nonempty: bool = False

    def contains(self, value: Any) -> bool:
        """Whether one scalar ``value`` (an item, for list fields) is allowed."""
        if self.choices:
            if self.separator and isinstance(value, str):
                parts = [p.strip() for p in value.split(self.separator)]
                return bool(parts) and all(p in self.choices for p in parts)
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def describe(self) -> str:
        """What is allowed, in words, e.g. ``"one of bf16, fp16, fp32"`` or ``"a number in [0, 1]"``."""
        if self.choices:
            names = ", ".join(repr(c) if c == "" else str(c) for c in self.choices)  # '' = unset
            if self.separator:
                return f"one or more of {names} (joined by {self.separator!r})"
            return f"one of {names}"
        fmt = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
        if self.low is not None and self.high is not None:
            return (f"a number in {'(' if self.low_open else '['}{fmt(self.low)}, "
                    f"{fmt(self.high)}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"a number {'>' if self.low_open else '>='} {fmt(self.low)}"
        if self.high is not None:
            return f"a number {'<' if self.high_open else '<='} {fmt(self.high)}"
        return "any value"

    def describe_field(self) -> str:
        text = self.describe()
        if self.length is not None:
            text = f"{self.length} items, each {text}"
        elif self.nonempty:
            text = f"a non-empty list, each {text}"
        return text


def one_of(*choices: Any, separator: str = "") -> Domain:
    return Domain(choices=tuple(choices), separator=separator)


def at_least(low: float, **kw: Any) -> Domain:
    return Domain(low=low, **kw)


def above(low: float, **kw: Any) -> Domain:
    return Domain(low=low, low_open=True, **kw)


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False, **kw: Any) -> Domain:
    return Domain(low=low, high=high, low_open=low_open, high_open=high_open, **kw)


PRECISIONS = ("bf16", "fp16", "fp32")
POOLINGS = ("cls", "mean")
OBJECTIVES = ("pacl", "clip")
SCHEDULES = ("progressive", "all")
PROTOCOLS = ("linear", "finetune", "zeroshot")
INGEST_FORMATS = ("auto", "jsonl", "csv", "parquet", "webdataset", "tumemo")
FEATURE_DTYPES = ("float32", "float16")
INTERPOLATIONS = ("", "bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")  # timm's names


def _f(default: Any, meaning: str, domain: Optional[Domain] = None) -> Any:
    """A config field: its default, one-line meaning and domain (None = any value of its type).
    Mutable defaults (lists, mappings) are copied per instance."""
    metadata = {"meaning": meaning, "domain": domain}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def check_actor_pool(section: str, min_actors: int, max_actors: int) -> None:
    """An inference section's actor pool bounds: ``min_actors <= max_actors`` (each field's own
    domain is checked with it). Raises :class:`ConfigError` naming both keys and values."""
    if min_actors > max_actors:
        raise ConfigError(f"{section}.min_actors={min_actors!r} is not allowed: expected at most "
                          f"{section}.max_actors={max_actors!r} (the pool autoscales between them)")


# Keys that were renamed: reading one names what to use instead.
RENAMED_KEYS = {
    f"{section}.concurrency": f"{section}.min_actors and {section}.max_actors (an autoscaling actor pool; "
                              f"the old concurrency: N is min_actors: N, max_actors: N)"
    for section in ("partition", "embed", "evaluate")
}


# --------------------------------------------------------------------------- sections


@dataclass
class RayConfig:
    """How to reach Ray. An empty address starts (or joins) a local instance."""

    address: str = _f("", "Ray address (auto, ray://host:10001); empty starts or joins a local instance")
    num_cpus: Optional[int] = _f(None, "logical CPUs of a local instance; null = max(cores, 8)", at_least(1))
    num_gpus: Optional[int] = _f(None, "GPUs of a local instance; null = autodetect", at_least(0))
    # An actor pays a process start, imports and a model load, which dominate a small input (the
    # embedded world's 2400 pairs on 2 cores: scoring 66 s in actor pools, 20 s in process).
    in_process_max_rows: int = _f(
        4096, "inference stages over at most this many rows run in the calling process instead of "
        "Ray Data actor pools (unless GPUs it cannot use exist); 0 = always Ray Data", at_least(0))


@dataclass
class ModelConfig:
    """The models shared by several stages (paper 4.2)."""

    backbone: str = _f("resnet50", "target visual backbone: a timm name, or open_clip:<arch> for a CLIP "
                       "tower (paper 4.2)")
    backbone_pretrained: str = _f("true", "timm: true/false for the hub weights; open_clip: a pretrained "
                                  "tag (openai) or empty")
    backbone_checkpoint: str = _f("", "local backbone weights (safetensors or torch file); overrides "
                                  "backbone_pretrained when set")
    backbone_input_size: int = _f(0, "input resolution of the backbone's transforms in px; 0 = the "
                                  "model's pretrained_cfg size", at_least(0))
    backbone_kwargs: dict[str, Any] = _f({}, "keyword arguments of timm.create_model for the backbone "
                                         "(drop_path_rate, stem_type, ...); recorded in the export")
    crop_pct: Optional[float] = _f(None, "eval centre-crop fraction of the backbone's transforms (1.0 = "
                                   "resize only, no crop); null = the model's pretrained_cfg",
                                   between(0, 1, low_open=True))
    interpolation: str = _f("", "resize interpolation of the backbone's transforms; empty = the model's "
                            "pretrained_cfg", one_of(*INTERPOLATIONS))
    text_encoder: str = _f("Yaxin/roberta-large-ernie2-skep-en", "frozen text encoder: Hugging Face "
                           "AutoModel id or local directory (paper 4.2: SKEP)")
    text_pooling: str = _f("cls", "text feature pooling: cls = first token (paper), mean = non-padding "
                           "average", one_of(*POOLINGS))
    text_max_length: int = _f(128, "text encoder max tokens per text", at_least(1))
    embed_dim: int = _f(768, "shared width of the bias-free projection heads (SPEC Paper defaults "
                         "Choice: 768)", at_least(1))


@dataclass
class IngestConfig:
    """Stage 0: manifests into one validated table."""

    manifest: str = _f("", "image-text pairs: JSONL/CSV/Parquet file, WebDataset shard dir/glob, or "
                       "TumEmo folder")
    format: str = _f("auto", "manifest format; auto = by file name", one_of(*INGEST_FORMATS))
    clean_text: bool = _f(True, "strip URLs, mentions and markup from texts")
    max_image_pixels: int = _f(89_478_485, "largest decodable image in pixels (Pillow's decompression-"
                               "bomb limit)", at_least(1))
    # Off by default: resizing is lossy and changes the stored bytes (so every downstream stage's
    # key); the decoders' draft mode already reads large JPEGs at reduced scale. Turn it on
    # (img2dataset-style, e.g. 512) when decoding limits the step rate: decode + transform then
    # costs about the same whatever the source size (benchmarks/decode_bench.py).
    max_image_side: int = _f(0, "store images resized so the longer side is at most this many px (aspect "
                             "ratio kept, JPEG at quality 95, original size recorded); 0 = keep the size",
                             at_least(0))
    fail_if_all_bad: bool = _f(True, "stop with an error when no pair survives validation")


@dataclass
class PartitionConfig:
    """Stage 1 (paper 3.1): factual and emotional match scores and the partition code."""

    clip_model: str = _f("ViT-B-32", "open_clip architecture of the factual scorer (paper 3.1: CLIP)")
    clip_pretrained: str = _f("openai", "open_clip pretrained tag or local checkpoint of the factual scorer")
    anp_vocab: str = _f("", "adjective-noun-pair vocabulary file; empty = the one shipped in pacl_ray/data "
                        "(SPEC Partitions Choice)")
    anp_top_k: int = _f(3, "ANPs per image that form its emotional description (paper 3.1)", at_least(1))
    sentiment_model: str = _f("finiteautomata/bertweet-base-sentiment-analysis",
                              "text sentiment model of the emotional score (paper 3.1: BERTweet)")
    sentiment_pooling: str = _f("cls", "sentiment model feature pooling", one_of(*POOLINGS))
    factual_calibration: str = _f("clipscore", "scale the factual threshold is read on (SPEC Partitions "
                                  "Choice)", one_of(*CALIBRATIONS))
    emotional_calibration: str = _f("clipscore", "scale the emotional threshold is read on (SPEC "
                                    "Partitions Choice)", one_of(*CALIBRATIONS))
    sigma: float = _f(0.7, "match threshold sigma of both calibrated scores (paper 3.1, Table 5)",
                      between(0, 1))
    sigma_factual: Optional[float] = _f(None, "factual threshold; null = sigma", between(0, 1))
    sigma_emotional: Optional[float] = _f(None, "emotional threshold; null = sigma", between(0, 1))
    use_scores: str = _f("both", "scores thresholded: both (paper 3.1); factual or emotional = Table 4's "
                         "one-score partition, the other score matched for every pair (SPEC Choice sample usage)",
                         one_of(*USE_SCORES))
    batch_size: int = _f(128, "pairs per scoring batch", at_least(1))
    min_actors: int = _f(1, "actors each scoring model pool (CLIP, sentiment) keeps at least (Ray Data "
                         "ActorPoolStrategy min_size)", at_least(1))
    max_actors: int = _f(1, "actors each scoring model pool grows to while inputs queue (max_size; with GPUs "
                         "max_actors x num_gpus GPUs per model)", at_least(1))
    num_gpus: float = _f(1.0, "GPUs per scoring actor when the cluster has GPUs", at_least(0))
    precision: str = _f("bf16", "autocast dtype of scoring on GPU (CPU always fp32)", one_of(*PRECISIONS))
    report_examples: int = _f(8, "pairs per partition in the HTML gallery", at_least(0))

    def __post_init__(self) -> None:
        check_actor_pool("partition", self.min_actors, self.max_actors)


@dataclass
class EmbedConfig:
    """Stage 2a (paper 3.2): initial backbone image features and frozen text features."""

    feature_dtype: str = _f("float32", "stored feature dtype", one_of(*FEATURE_DTYPES))
    batch_size: int = _f(128, "pairs per embedding batch", at_least(1))
    min_actors: int = _f(1, "actors each embedding model pool (image, text) keeps at least (Ray Data "
                         "ActorPoolStrategy min_size)", at_least(1))
    max_actors: int = _f(1, "actors each embedding model pool grows to while inputs queue (max_size; with "
                         "GPUs max_actors x num_gpus GPUs per model)", at_least(1))
    num_gpus: float = _f(1.0, "GPUs per embedding actor when the cluster has GPUs", at_least(0))
    precision: str = _f("bf16", "autocast dtype of embedding on GPU (CPU always fp32)", one_of(*PRECISIONS))

    def __post_init__(self) -> None:
        check_actor_pool("embed", self.min_actors, self.max_actors)


@dataclass
class ClusterConfig:
    """Stage 2b (paper 3.2): k-means pseudo-labels for every K in one pass."""

    ks: list[int] = _f([2], "every K whose k-means pseudo-labels are computed, in one pass (paper 3.2)",
                       at_least(1, nonempty=True))
    max_iter: int = _f(50, "k-means iterations at most", at_least(1))
    tol: float = _f(1e-6, "stop when the largest centroid shift is below this", at_least(0))
    num_shards: int = _f(0, "k-means data shards; 0 = one per 50k points, 1 = single-process FAISS",
                         at_least(0))
    use_gpu: bool = _f(True, "FAISS on GPU when the actor has one")


@dataclass
class TrainConfig:
    """Stage 3 (paper 3.3): partition-adaptive contrastive training on Ray Train."""

    objective: str = _f("pacl", "pacl = partition-adaptive loss (paper 3.3); clip = vanilla contrastive, "
                        "every pair strong-coupled", one_of(*OBJECTIVES))
    schedule: str = _f("progressive", "progressive = partitions join by phase (paper Eqs. 15-17); all = "
                       "every partition from the start", one_of(*SCHEDULES))
    k: int = _f(2, "which K's pseudo-labels train (paper 4.2: K=2)", at_least(1))
    temperature: float = _f(0.07, "contrastive temperature tau (paper 4.2: 0.07)", above(0))
    epochs: int = _f(30, "training epochs (paper 4.2: 30)", at_least(1))
    global_batch_size: int = _f(64, "pairs per step across all workers (paper 4.2: 64)", at_least(1))
    num_workers: int = _f(1, "Ray Train data-parallel workers", at_least(1))
    max_workers: Optional[int] = _f(None, "elastic training upper bound (num_workers..max_workers); null "
                                    "= fixed", at_least(1))
    resources_per_worker: dict[str, float] = _f(
        {}, "Ray resources of each Train worker, e.g. {CPU: 8, GPU: 1} or a node label; empty = Ray "
        "Train's default", at_least(0))
    use_gpu: Optional[bool] = _f(None, "train on GPUs; null = when the cluster has GPUs")
    lr_backbone: Optional[float] = _f(None, "backbone learning rate; null = by architecture (SPEC Paper "
                                      "defaults)", above(0))
    partitions: list[int] = _f([1, 2, 3, 4], "partition codes ever trained on; each phase gets its intersection "
                               "with this (SPEC Choice sample usage, paper Table 4)",
                               Domain(choices=(1, 2, 3, 4), nonempty=True))
    lr_heads: float = _f(1e-3, "projection heads' learning rate (paper 4.2: 1e-3)", above(0))
    weight_decay: float = _f(0.02, "AdamW weight decay, not on norms and biases (SPEC Training recipe Choice: "
                             "0.02)", at_least(0))
    warmup_steps: int = _f(0, "linear warmup optimiser steps before the cosine decay (SPEC Training recipe "
                           "Choice: 0)", at_least(0))
    grad_clip: float = _f(0.0, "gradient norm clip; 0 = off", at_least(0))
    precision: str = _f("bf16", "autocast dtype of training on GPU (CPU always fp32)", one_of(*PRECISIONS))
    checkpoint_every_steps: int = _f(0, "checkpoint every this many steps; 0 = every epoch only", at_least(0))
    max_failures: int = _f(3, "Ray Train restarts after a worker failure; -1 = unlimited", at_least(-1))
    image_size: int = _f(0, "training input size in px, also the export's evaluation size (evaluated "
                         "uncropped unless model.crop_pct is set); 0 = the backbone's own", at_least(0))
    # One augmentation for timm backbones and open_clip towers alike (pacl_ray.core.pacl_model).
    crop_scale: list[float] = _f([0.5, 1.0], "random-resized-crop area range [low, high] (SPEC Training "
                                 "recipe Choice: at least half the image)", between(0, 1, low_open=True, length=2))
    hflip: float = _f(0.5, "horizontal flip probability of the training augmentation (SPEC Training recipe "
                      "Choice: 0.5)", between(0, 1))
    color_jitter: float = _f(0.0, "colour jitter strength of the training augmentation; 0 = off (SPEC Training "
                             "recipe Choice: off, colour is an emotional cue)", at_least(0))
    log_every_steps: int = _f(10, "print training metrics and read the steps' values back from the device every "
                              "this many steps (the finite-loss check runs then; TensorBoard gets every step; Ray "
                              "Train reports go with checkpoints)", at_least(1))
    compile: Optional[bool] = _f(None, "torch.compile the model for the training step; null = on CUDA, off on "
                                 "CPU")
    channels_last: Optional[bool] = _f(None, "NHWC model and images in the training step; null = for conv nets "
                                       "on CUDA")
    # Same batches either way; copying saves seconds per epoch on small data.
    in_memory_max_mb: float = _f(256.0, "a joined dataset up to this size is copied into each worker "
                                 "instead of streamed by Ray Data every epoch; 0 = always stream", at_least(0))
    # The epoch order is built from ids alone (stages/train_feed.py); both keys change the order.
    feed_shards: int = _f(16, "canonical shards of a global batch (the largest divisor of the global batch "
                          "up to this); W workers each read 1/W of the image bytes per epoch when W divides "
                          "it, and any W gives the same batches", at_least(1))
    feed_chunk_rows: int = _f(64, "pairs per storage chunk (one Parquet row group of the training feed), at "
                              "most; small data gets smaller chunks (16 per shard); shuffling moves whole "
                              "chunks between shards, pairs within a chunk", at_least(1))
    # Ray Data's resource limit on each worker's feed pipeline; the batches do not depend on it.
    feed_object_store_mb: float = _f(256.0, "object-store budget (MiB) of each worker's streamed feed: the "
                                     "chunks read, decoded and prefetched in flight at once; bounds the feed's "
                                     "object-store use whatever the dataset size (a soft Ray Data limit: one "
                                     "decode task always runs)", above(0))
    sync_batchnorm: Optional[bool] = _f(None, "BatchNorm statistics over the global batch (SPEC Training "
                                        "recipe); null = on when a run has more than one worker and the "
                                        "backbone has BatchNorm")


@dataclass
class ValidationConfig:
    """The training stage's held-out validation probe (issue 20; pacl_ray.stages.validation): a
    cosine kNN vote on the current backbone's pooled features, reported as val_acc (percent) with
    the epoch's checkpoint. It is what a sweep's ASHA ranks trials on; the training loss is not
    comparable across trials. Off by default (it adds a feature pass per validated epoch)."""

    every_epochs: int = _f(0, "run the probe at the end of every this many epochs and at the last one; "
                           "0 = off", at_least(0))
    task: str = _f("", "labelled task spec (pacl_ray.evaluation.tasks grammar; kinds single, imagefolder or "
                   "hierarchical); empty = the first of evaluate.tasks. Its train split is the kNN bank, its "
                   "val split the queries; its test split is never read")
    max_images: int = _f(256, "images per split (bank, queries) at most: a seeded choice fixed by the task's "
                         "split seed, the same for every trial", at_least(1))
    k: int = _f(10, "neighbours of the cosine kNN vote", at_least(1))
    batch_size: int = _f(128, "images per feature batch of the probe", at_least(1))


@dataclass
class EvaluateConfig:
    """Downstream evaluation (paper 4.4, 4.5)."""

    tasks: list[str] = _f([], "downstream task specs (see pacl_ray.evaluation.tasks)")
    protocol: str = _f("linear", "linear probe, fine-tuning or zero-shot (paper 4.4, 4.5.2); several "
                       "comma-separated", one_of(*PROTOCOLS, separator=","))
    linear_lr: float = _f(1e-2, "linear probe learning rate (paper 4.4: 1e-2)", above(0))
    linear_epochs: int = _f(40, "linear probe epochs (paper 4.4: 40)", at_least(1))
    finetune_lr: Optional[float] = _f(None, "fine-tuning learning rate; null = 1e-4 for ResNet-50, 1e-5 "
                                      "otherwise (paper 4.4)", above(0))
    finetune_epochs: int = _f(40, "fine-tuning epochs (paper 4.4: 40)", at_least(1))
    batch_size: int = _f(64, "evaluation batch size", at_least(1))
    split_seed: int = _f(0, "seed of the 8:1:1 split of datasets without one (SPEC Downstream)", at_least(0))
    prompts: list[str] = _f(["A photo with {} emotion.", "The photo makes me feel so {}!"],
                            "zero-shot prompt templates, {} = class name (paper 4.5.2)")
    weight_decay: float = _f(0.0, "AdamW weight decay of the linear head and of fine-tuning", at_least(0))
    min_actors: int = _f(1, "feature-extraction actors kept at least (Ray Data ActorPoolStrategy min_size)",
                         at_least(1))
    max_actors: int = _f(1, "feature-extraction actors the pool grows to while images queue (max_size; with "
                         "GPUs max_actors x num_gpus GPUs)", at_least(1))
    num_gpus: float = _f(1.0, "GPUs per feature-extraction actor / fine-tuning task when the cluster "
                         "has GPUs", at_least(0))
    precision: str = _f("bf16", "autocast dtype of evaluation on GPU (CPU always fp32)", one_of(*PRECISIONS))
    compare_initial: bool = _f(True, "with a PACL export, also evaluate its initial weights (Table 1 rows)")
    num_workers: int = _f(0, "fine-tuning DataLoader worker processes", at_least(0))

    def __post_init__(self) -> None:
        check_actor_pool("evaluate", self.min_actors, self.max_actors)


@dataclass
class TrackingConfig:
    """Opt-in experiment trackers of sweeps, through Ray Tune's logger callbacks
    (pacl_ray.sweeps.tracking). TensorBoard event files are always written."""

    mlflow_uri: str = _f("", "MLflow tracking URI of sweep runs (sqlite:///path/mlflow.db, http://host:5000, "
                         "file:///path/mlruns with MLFLOW_ALLOW_FILE_STORE=true); empty = no MLflow")
    mlflow_experiment: str = _f("", "MLflow experiment name; empty = the sweep's name")
    wandb_project: str = _f("", "W&B project of sweep runs; empty = no W&B")
    wandb_mode: str = _f("offline", "W&B mode: offline writes local files (wandb sync uploads them)",
                         one_of("offline", "online"))


@dataclass
class RunConfig:
    """The whole pipeline's configuration."""

    name: str = _f("pacl", "a label saved with the run's config; stage outputs are keyed by content, not "
                   "by name (a sweep's name is pacl-ray tune --name)")
    output_dir: str = _f("~/.cache/pacl_ray/runs", "where stage outputs go: local path or pyarrow URI "
                         "(s3://, gs://)")
    seed: int = _f(0, "seed of model init, k-means and data order", at_least(0))
    ray: RayConfig = field(default_factory=RayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# --------------------------------------------------------------------------- coercion


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


_PLURALS = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
_SAMPLE_LISTS = {bool: [True, False], int: [2, 3], float: [0.5, 1.0], str: ["a", "b"]}


def kind_of(annotation: Any) -> str:
    """A value of ``annotation`` in words: "an integer", "a list of integers", "a number or null"."""
    if annotation is Any:
        return "any value"
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = typing.get_args(annotation)
        words = [w for a in args if a is not type(None) for w in (("true", "false") if a is bool else (kind_of(a),))]
        words += ["null"] if type(None) in args else []
        return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]
    if origin is list:
        return f"a list of {_PLURALS.get(typing.get_args(annotation)[0], 'values')}"
    if origin is dict:
        return f"a mapping of names to {_PLURALS.get(typing.get_args(annotation)[1], 'values')}"
    if dataclasses.is_dataclass(annotation):
        return "a section (a mapping of its keys)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a type annotation, converting only lossless cases (int -> float)."""
    if annotation is Any:  # free-form values (model.backbone_kwargs): whatever YAML gives
        return value
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        nested = [e for e in errors if not e.startswith(f"{key}: expected ")]  # an item's or entry's error
        raise ConfigError(nested[0] if nested else f"{key}: expected {kind_of(annotation)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {kind_of(annotation)}, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {kind_of(annotation)}, got {value!r}")
        key_type, value_type = typing.get_args(annotation)
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _from_dict(annotation, value, prefix=f"{key}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML (YAML 1.1) reads exponents without a dot, as in "lr: 1e-5", as strings
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported annotation {annotation!r}")


# --------------------------------------------------------------------------- error messages


def _example(annotation: Any, value: Any, default: Any) -> Any:
    """A valid value of ``annotation`` to show in an error: the user's own ``value`` made valid
    where that is plain (``"2,3"`` -> ``[2, 3]`` for a list), else the default, else a typical value."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        arg = next(a for a in typing.get_args(annotation) if a is not type(None))
        return _example(arg, value, default)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str) and "," in value:  # "2,3": a list written without brackets
            try:
                return [_coerce(yaml.safe_load(part), item_type, "") for part in value.split(",") if part.strip()]
            except (yaml.YAMLError, ConfigError):
                pass
        if isinstance(default, list) and len(default) >= 2:
            return default[:2]
        return list(_SAMPLE_LISTS.get(item_type, ["a", "b"]))
    if origin is dict:
        if isinstance(default, dict) and default:
            return dict(list(default.items())[:1])
        value_type = typing.get_args(annotation)[1]
        return {"name": _example(value_type, None, None) if value_type is not Any else "value"}
    if annotation is bool:
        return bool(default) if isinstance(default, bool) else True
    if annotation is int:
        return default if isinstance(default, int) and not isinstance(default, bool) else 1
    if annotation is float:
        return default if isinstance(default, (int, float)) and not isinstance(default, bool) else 0.5
    if annotation is str:
        return default if isinstance(default, str) and default else "text"
    return default


def _render(value: Any, separator: str = ", ") -> str:
    """``value`` as YAML flow text (``[2, 3]``, ``{CPU: 2}``, ``true``), items joined by ``separator``."""
    if isinstance(value, list):
        return "[" + separator.join(_render(v, separator) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_render(v, separator)}" for k, v in value.items()) + "}"
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def example_text(key: str, annotation: Any, value: Any = None, default: Any = None, style: str = "yaml") -> str:
    """How to write a valid value of ``key``: ``e.g. --set cluster.ks=[2,3]`` (``style="set"``, a
    command-line override) or ``e.g. cluster.ks: [2, 3]`` (``"yaml"``: a config or space file);
    an optional key adds its ``null``."""
    if dataclasses.is_dataclass(annotation):  # a section: one of its keys
        first = dataclasses.fields(annotation)[0]
        return example_text(f"{key}.{first.name}", typing.get_type_hints(annotation)[first.name], None,
                            getattr(annotation(), first.name), style)
    example = _example(annotation, value, default)
    optional = typing.get_origin(annotation) in (Union, types.UnionType) and type(None) in typing.get_args(annotation)
    if style == "set":
        text = f"{key}={_render(example, ',')}"
        text = f"'{text}'" if " " in text else text
        return f"e.g. --set {text}" + (f" or --set {key}=null" if optional else "")
    return f"e.g. {key}: {_render(example)}" + (f" or {key}: null" if optional else "")


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def close_keys(prefix: str, name: str, allowed: Any, where: str = "", config_keys: bool = True) -> str:
    """``did you mean train.epochs? valid keys under train: ...`` for an unknown ``name`` under
    ``prefix`` (e.g. ``"train."``; ``""``: the top level): close matches
    (:func:`difflib.get_close_matches`) among ``allowed`` (the names valid there), or, for a config
    key (``config_keys``) with none there, the same name in another section (``train.sigma`` ->
    ``partition.sigma``). ``where``: how the valid keys are introduced (default: "under <section>"
    or "at the top level")."""
    allowed = sorted(str(a) for a in allowed)
    name = str(name)
    matches = [f"{prefix}{m}" for m in difflib.get_close_matches(name, allowed, n=3, cutoff=0.6)]
    if not matches and config_keys:
        matches = [k for k in _leaf_keys(RunConfig) if k.rsplit(".", 1)[-1] == name]
    section = prefix.rstrip(".")
    where = where or (f"under {section}" if section else "at the top level")
    guess = f"did you mean {' or '.join(matches)}? " if matches else ""
    return f"{guess}valid keys {where}: {', '.join(allowed)}"


def unknown_key_message(prefix: str, name: str, allowed: Any) -> str:
    """``unknown config key train.epoch; did you mean train.epochs? valid keys under train: ...``
    (:func:`close_keys`)."""
    return f"unknown config key {prefix}{name}; {close_keys(prefix, name, allowed)}"


def key_error(key: str, named: bool = True) -> Optional[str]:
    """Why a dotted ``key`` is not a config value's key (an unknown key, with close matches and the
    valid keys of its section; a section's name), or None when it is one. Entries of a mapping
    field (``model.backbone_kwargs.drop_path_rate``) are free-form. ``named=False``: an unknown
    key's message without its "unknown config key KEY; " head (for callers that name the key)."""
    cls: Any = RunConfig
    prefix = ""
    for part in key.split("."):
        if typing.get_origin(cls) is dict:
            return None
        if not dataclasses.is_dataclass(cls):
            return f"{prefix.rstrip('.')} is a value, not a section: {key} is not a config key"
        hints = typing.get_type_hints(cls)
        if part not in hints:
            if f"{prefix}{part}" in RENAMED_KEYS:
                return f"config key {prefix}{part} was replaced by {RENAMED_KEYS[prefix + part]}"
            fields = [f.name for f in dataclasses.fields(cls)]
            return unknown_key_message(prefix, part, fields) if named else close_keys(prefix, part, fields)
        cls, prefix = hints[part], f"{prefix}{part}."
    if dataclasses.is_dataclass(cls):
        fields = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
        return f"{key} is a section, not a key; valid keys under {key}: {fields}"
    return None


def _check_layer(data: dict, cls: type, prefix: str, source: str, style: str) -> None:
    """One layer's keys and value types (a config file, an override), checked before the layers
    are merged so that an error names where the key was written (``source``: the file, or
    ``--set KEY=VALUE``) and shows how to write it (``style``, see :func:`example_text`). Domains and
    keys that depend on each other are checked after merging (:func:`from_dict`)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            if key in RENAMED_KEYS:
                raise ConfigError(f"config key {key} was replaced by {RENAMED_KEYS[key]}")
            raise ConfigError(f"{source}: {unknown_key_message(prefix, name, fields)}")
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
            _check_layer(value, annotation, f"{key}.", source, style)
            continue
        try:
            _coerce(value, annotation, key)
        except ConfigError as err:
            shown = key if style == "set" else name
            hint = example_text(shown, annotation, value, getattr(cls(), name), style)
            raise ConfigError(f"{source}: {err}; {hint}") from None


def check_domain(key: str, value: Any, domain: Optional[Domain]) -> None:
    """Raise :class:`ConfigError` naming ``key``, ``value`` and what is allowed unless ``value`` (a
    coerced field value; None passes, it means "derived") is inside ``domain``."""
    if domain is None or value is None:
        return
    allowed = domain.describe_field()
    if isinstance(value, list):
        if domain.length is not None and len(value) != domain.length:
            raise ConfigError(f"{key}={value!r} is not allowed: expected {allowed}")
        if domain.nonempty and not value:
            raise ConfigError(f"{key}={value!r} is not allowed: expected {allowed}")
        items = list(enumerate(value))
    elif isinstance(value, dict):
        items = list(value.items())
    else:
        if not domain.contains(value):
            raise ConfigError(f"{key}={value!r} is not allowed: expected {allowed}")
        return
    for index, item in items:
        if not domain.contains(item):
            where = f"{key}[{index}]" if isinstance(value, list) else f"{key}.{index}"
            raise ConfigError(f"{where}={item!r} is not allowed: expected {domain.describe()}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown and f"{prefix}{unknown[0]}" in RENAMED_KEYS:
        raise ConfigError(f"config key {prefix}{unknown[0]} was replaced by {RENAMED_KEYS[prefix + unknown[0]]}")
    if unknown:
        raise ConfigError(unknown_key_message(prefix, unknown[0], fields))
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        try:
            kwargs[name] = _coerce(value, hints[name], key)
        except ConfigError as err:
            if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
                raise  # a key inside the section: its own message has its example
            raise ConfigError(f"{err}; {example_text(key, hints[name], value, getattr(cls(), name))}") from None
        check_domain(key, kwargs[name], fields[name].metadata.get("domain"))
    return cls(**kwargs)


def from_dict(data: dict | None) -> RunConfig:
    """Build a :class:`RunConfig` from a nested mapping, validating every key, type and domain."""
    return _from_dict(RunConfig, data or {})


def to_dict(cfg: Any) -> dict:
    """The nested plain-dict form of a config dataclass (YAML-serialisable)."""
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- keys and descriptions


@dataclass(frozen=True)
class FieldInfo:
    """One leaf key of :class:`RunConfig` as ``pacl-ray config`` lists it."""

    key: str  # dotted, e.g. "train.temperature"
    type: str  # e.g. "float", "int | null", "list[int]"
    default: Any
    allowed: str  # e.g. "a number > 0"; "" = any value of its type
    meaning: str
    domain: Optional[Domain] = None


def _type_name(annotation: Any) -> str:
    if annotation is Any:
        return "any"
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(annotation))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(annotation))}]"
    return getattr(annotation, "__name__", str(annotation))


def describe_fields(cls: type = RunConfig, prefix: str = "") -> list[FieldInfo]:
    """Every leaf key of ``cls`` in definition order, with type, default, allowed values, meaning."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    out: list[FieldInfo] = []
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            out.extend(describe_fields(annotation, f"{prefix}{f.name}."))
            continue
        domain = f.metadata.get("domain")
        out.append(FieldInfo(f"{prefix}{f.name}", _type_name(annotation), getattr(defaults, f.name),
                             domain.describe_field() if domain else "", f.metadata.get("meaning", ""), domain))
    return out


def format_fields(fields: list[FieldInfo] | None = None) -> str:
    """The table ``pacl-ray config`` prints: key, type, default, allowed values and meaning."""
    lines = []
    for info in fields if fields is not None else describe_fields():
        default = yaml.safe_dump(info.default, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
        lines.append(f"{info.key}  ({info.type}, default {default})")
        if info.allowed:
            lines.append(f"    allowed: {info.allowed}")
        lines.append(f"    {info.meaning}")
    return "\n".join(lines)


def leaf_annotation(key: str) -> Any:
    """The annotation of a dotted key (``float`` for ``partition.sigma``, a dataclass for a
    section); None when the key does not exist."""
    cls: Any = RunConfig
    annotation: Any = None
    for part in key.split("."):
        if typing.get_origin(cls) is dict:  # a mapping field's entry (model.backbone_kwargs.drop_path_rate)
            annotation = cls = typing.get_args(cls)[1]
            continue
        if not dataclasses.is_dataclass(cls):
            return None
        annotation = typing.get_type_hints(cls).get(part)
        cls = annotation
    return annotation


def is_section(key: str) -> bool:
    """Whether a dotted key names a section (``train``) rather than a value (``train.epochs``)."""
    return dataclasses.is_dataclass(leaf_annotation(key))


# --------------------------------------------------------------------------- layering


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"train.epochs=30"`` into (["train", "epochs"], 30); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({err})") from None
    return key.split("."), value


def set_dotted(data: dict, key: str, value: Any) -> dict:
    """Set ``a.b.c`` in a nested mapping (in place; also returned)."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[parts[-1]] = value
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted ``key=value`` overrides to a nested mapping (in place; also returned)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def merge(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into a copy of ``base``."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str) -> dict:
    """A YAML config file (any pyarrow URI) as a mapping; ConfigError when it is not one."""
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err})") from None
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return loaded


def layer_config(*layers: dict | str | list[str] | None) -> dict:
    """Layer config sources, later winning, into one validated nested dict (every key present).

    Each layer is a nested mapping (world settings, a space's ``fixed``; deep-merged like a YAML
    file) whose keys may also be dotted (``{"train.k": 3}``, a sweep trial's values; a dotted key
    replaces its value), a YAML file path/URI (str, deep-merged), or a list of ``key=value``
    overrides (``--set``). The result passes through :func:`from_dict`, so every value is type-
    and domain-checked."""
    data = to_dict(RunConfig())
    for layer in layers:
        if layer is None:
            continue
        if isinstance(layer, str):
            loaded = read_yaml(layer)
            _check_layer(loaded, RunConfig, "", storage.redact(layer), "yaml")
            data = merge(data, loaded)
        elif isinstance(layer, (list, tuple)):
            for text in layer:
                path, value = parse_override(text)
                nested: Any = value
                for part in reversed(path):
                    nested = {part: nested}
                _check_layer(nested, RunConfig, "", f"--set {text.strip()}", "set")
            apply_overrides(data, list(layer))
        else:
            for key, value in layer.items():
                if isinstance(key, str) and "." in key:
                    set_dotted(data, key, value)  # a dotted key replaces its value, as --set does
                else:
                    data = merge(data, {key: value})
    return to_dict(from_dict(data))


def load_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (any pyarrow URI), apply overrides and validate everything."""
    return from_dict(layer_config(path or None, list(overrides or [])))


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML text, with credentials in URIs redacted
    (:func:`pacl_ray.formats.storage.redact`): every saved or printed config goes through here."""
    data = to_dict(cfg)
    data["output_dir"] = storage.redact(data["output_dir"])
    return yaml.safe_dump(data, sort_keys=False)


def save_config(cfg: RunConfig, directory: str, filename: str = "config.yaml") -> str:
    """Write the resolved config beside a run's outputs; returns the file's URI."""
    uri = storage.join(directory, filename)
    storage.write_text(uri, dump_config(cfg))
    return uri


def check_output_dir(uri: str, key: str = "output_dir") -> str:
    """Make sure ``uri`` (local path or pyarrow URI) can be written before any work starts: create
    it and write and delete a small probe file. Returns the normalised URI; raises
    :class:`ConfigError` naming ``key``, the value and the filesystem's reason otherwise."""
    target = storage.normalize(uri)
    probe = storage.join(target, f".pacl_ray-write-check-{os.getpid()}")
    try:
        storage.makedirs(target)
        storage.write_text(probe, "")
        fs, path = storage.resolve(probe)
        fs.delete_file(path)
    except (OSError, ValueError) as err:  # PermissionError, pyarrow's ArrowIOError / ArrowInvalid
        raise ConfigError(f"{key}={uri!r} is not writable: {err}") from None
    return target


# --------------------------------------------------------------------------- adapters to core


def partition_args(pcfg: PartitionConfig) -> dict:
    """Keyword arguments of :func:`pacl_ray.core.partitions.assign_partitions` from a PartitionConfig
    (thresholds default to ``sigma``; ``use_scores`` picks Table 4's one-score partitions)."""
    return {
        "sigma_factual": float(pcfg.sigma if pcfg.sigma_factual is None else pcfg.sigma_factual),
        "sigma_emotional": float(pcfg.sigma if pcfg.sigma_emotional is None else pcfg.sigma_emotional),
        "factual_calibration": pcfg.factual_calibration,
        "emotional_calibration": pcfg.emotional_calibration,
        "use_scores": pcfg.use_scores,
    }


def thresholds(pcfg: PartitionConfig) -> tuple[float, float]:
    """(sigma_factual, sigma_emotional) of a PartitionConfig; each defaults to ``sigma``."""
    args = partition_args(pcfg)
    return args["sigma_factual"], args["sigma_emotional"]


def model_args(cfg: RunConfig) -> dict:
    """Keyword arguments of :func:`pacl_ray.core.pacl_model.build_model` from a RunConfig."""
    return {
        "backbone": cfg.model.backbone, "pretrained": cfg.model.backbone_pretrained,
        "checkpoint": cfg.model.backbone_checkpoint, "input_size": cfg.model.backbone_input_size,
        "embed_dim": cfg.model.embed_dim, "seed": cfg.seed, "image_size": cfg.train.image_size,
        "crop_scale": tuple(cfg.train.crop_scale), "hflip": cfg.train.hflip,
        "color_jitter": cfg.train.color_jitter, "crop_pct": cfg.model.crop_pct,
        "interpolation": cfg.model.interpolation, "model_kwargs": dict(cfg.model.backbone_kwargs),
    }


def backbone_args(cfg: RunConfig) -> dict:
    """Keyword arguments of :func:`pacl_ray.core.backbones.create_backbone` for the initial backbone
    (embed stage): architecture, weights and transform settings from ``model.*``."""
    m = cfg.model
    return {"name": m.backbone, "pretrained": m.backbone_pretrained, "checkpoint": m.backbone_checkpoint,
            "input_size": m.backbone_input_size, "crop_pct": m.crop_pct, "interpolation": m.interpolation,
            "model_kwargs": dict(m.backbone_kwargs)}


def trained_transform_args(cfg: RunConfig) -> dict:
    """The transform settings of the trained backbone (its export and evaluation): ``input_size``
    (``train.image_size`` when set, else ``model.backbone_input_size``), ``crop_pct`` (``model.crop_pct``;
    when unset and ``train.image_size`` is set, 1.0: training at an explicit size evaluates the
    whole image) and ``interpolation``. :func:`pacl_ray.core.pacl_model.build_backbone` resolves the
    same."""
    m = cfg.model
    crop_pct = m.crop_pct if m.crop_pct is not None else (1.0 if cfg.train.image_size else None)
    return {"input_size": cfg.train.image_size or m.backbone_input_size, "crop_pct": crop_pct,
            "interpolation": m.interpolation}
