"""Typed configuration: one dataclass per stage, loaded from YAML, overridden with dotted keys.

This is the only place that parses configuration. Every stage receives the resolved
:class:`RunConfig` and saves it beside its outputs (see :func:`save_config`).

    cfg = load_config("configs/my.yaml", ["train.epochs=30", "partition.sigma=0.5"])

Unknown keys and values of the wrong type raise :class:`ConfigError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from pacl_ray.formats import storage


class ConfigError(ValueError):
    """A configuration key is unknown or its value has the wrong type."""


@dataclass
class RayConfig:
    """How to reach Ray. An empty address starts (or joins) a local instance."""

    address: str = ""
    num_cpus: Optional[int] = None  # local instance only; None = max(cores, 8) logical CPUs
    num_gpus: Optional[int] = None  # local instance only; None = autodetect
    # Inference stages (scoring, embed, evaluation features) over at most this many rows run their
    # Ray Data UDFs in the calling process instead of actor pools, unless the cluster has GPUs
    # that process cannot use. An actor pays a process start, imports and a model load, which
    # dominate a small input (the embedded world's 2400 pairs on 2 cores: scoring 66 s in actor
    # pools, 20 s in process). 0 = always Ray Data.
    in_process_max_rows: int = 4096


@dataclass
class ModelConfig:
    """The models shared by several stages (paper 4.2)."""

    # Target visual backbone: a timm name ("resnet50"), or "open_clip:<arch>" for a CLIP tower.
    backbone: str = "resnet50"
    # timm: true/false for the hub weights; open_clip: a pretrained tag ("openai") or "".
    backbone_pretrained: str = "true"
    # Local weights (safetensors or torch file); overrides backbone_pretrained when set.
    backbone_checkpoint: str = ""
    # Input resolution for the backbone's transforms; 0 = the model's own pretrained_cfg size.
    backbone_input_size: int = 0
    # Frozen text encoder: any Hugging Face AutoModel id or local directory (paper: SKEP).
    text_encoder: str = "Yaxin/roberta-large-ernie2-skep-en"
    text_pooling: str = "cls"  # "cls" (first token, as in the paper) or "mean"
    text_max_length: int = 128
    embed_dim: int = 768  # shared width of the projection heads


@dataclass
class IngestConfig:
    """Stage 0: manifests into one validated table."""

    manifest: str = ""  # JSONL/CSV/Parquet file, WebDataset shard dir/glob, or TumEmo folder
    format: str = "auto"  # auto | jsonl | csv | parquet | webdataset | tumemo
    clean_text: bool = True
    max_image_pixels: int = 89_478_485  # Pillow's default decompression-bomb limit
    fail_if_all_bad: bool = True


@dataclass
class PartitionConfig:
    """Stage 1 (paper 3.1): factual and emotional match scores and the partition code."""

    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "openai"  # open_clip tag, or a local checkpoint path
    anp_vocab: str = ""  # "" = the vocabulary shipped in pacl_ray/data
    anp_top_k: int = 3
    sentiment_model: str = "finiteautomata/bertweet-base-sentiment-analysis"
    sentiment_pooling: str = "cls"
    factual_calibration: str = "clipscore"  # raw | clipscore | rank
    emotional_calibration: str = "clipscore"
    sigma: float = 0.7
    sigma_factual: Optional[float] = None  # None = sigma
    sigma_emotional: Optional[float] = None  # None = sigma
    batch_size: int = 128
    concurrency: int = 1  # actors in the scoring pool (per model)
    num_gpus: float = 1.0  # GPUs per actor when the cluster has GPUs
    precision: str = "bf16"  # bf16 | fp16 | fp32 (fp32 on CPU regardless)
    report_examples: int = 8  # pairs per partition in the HTML gallery


@dataclass
class EmbedConfig:
    """Stage 2a (paper 3.2): initial backbone image features and frozen text features."""

    feature_dtype: str = "float32"  # float32 | float16
    batch_size: int = 128
    concurrency: int = 1
    num_gpus: float = 1.0
    precision: str = "bf16"


@dataclass
class ClusterConfig:
    """Stage 2b (paper 3.2): k-means pseudo-labels for every K in one pass."""

    ks: list[int] = field(default_factory=lambda: [2])
    max_iter: int = 50
    tol: float = 1e-6  # stop when the largest centroid shift is below this
    num_shards: int = 0  # 0 = one shard per 50k points (at least 1); 1 = single-process FAISS
    use_gpu: bool = True  # FAISS on GPU when the actor has one


@dataclass
class TrainConfig:
    """Stage 3 (paper 3.3): partition-adaptive contrastive training on Ray Train."""

    objective: str = "pacl"  # pacl | clip (vanilla: every pair strong-coupled)
    schedule: str = "progressive"  # progressive (Eqs. 15-17) | all
    k: int = 2  # which K's pseudo-labels to use
    temperature: float = 0.07
    epochs: int = 30
    global_batch_size: int = 64
    num_workers: int = 1
    max_workers: Optional[int] = None  # set for elastic training: (num_workers, max_workers)
    # Ray resources of each Train worker, e.g. {CPU: 8, GPU: 1} or a custom node label
    # {CPU: 1, gpu_node: 1}; empty = Ray Train's default (1 CPU, plus 1 GPU when use_gpu).
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    use_gpu: Optional[bool] = None  # None = when the cluster has GPUs
    lr_backbone: Optional[float] = None  # None = by architecture (SPEC "Paper defaults")
    lr_heads: float = 1e-3
    weight_decay: float = 0.05
    grad_clip: float = 0.0  # 0 = off
    precision: str = "bf16"  # autocast dtype on GPU; CPU always fp32
    checkpoint_every_steps: int = 0  # 0 = every epoch only
    max_failures: int = 3
    image_size: int = 0  # 0 = the backbone's own input size
    # Training augmentation of timm backbones (timm ``create_transform``; open_clip towers keep
    # open_clip's own train transform): random-resized-crop area range, flip and colour jitter.
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: float = 0.5
    color_jitter: float = 0.4
    log_every_steps: int = 10
    # A joined dataset (encoded images + metadata) up to this size is copied into each worker once
    # and batched there, instead of streamed through a Ray Data pipeline every epoch (same batches;
    # saves seconds per epoch on small data). 0 = always stream.
    in_memory_max_mb: float = 256.0


@dataclass
class EvaluateConfig:
    """Downstream evaluation (paper 4.4, 4.5)."""

    tasks: list[str] = field(default_factory=list)  # task specs, see pacl_ray.evaluation.evaluate
    protocol: str = "linear"  # linear | finetune | zeroshot
    linear_lr: float = 1e-2
    linear_epochs: int = 40
    finetune_lr: Optional[float] = None  # None = 1e-4 for ResNet-50, 1e-5 otherwise
    finetune_epochs: int = 10
    batch_size: int = 64
    split_seed: int = 0
    prompts: list[str] = field(
        default_factory=lambda: ["A photo with {} emotion.", "The photo makes me feel so {}!"]
    )
    weight_decay: float = 0.0  # AdamW weight decay of the linear head and of fine-tuning
    concurrency: int = 1  # feature-extraction actors (Ray Data)
    num_gpus: float = 1.0  # GPUs per feature-extraction actor / fine-tuning task when the cluster has GPUs
    precision: str = "bf16"  # bf16 | fp16 | fp32 autocast on GPU (CPU always fp32)
    compare_initial: bool = True  # with a PACL export, also evaluate its initial weights (Table 1 rows)
    num_workers: int = 0  # fine-tuning DataLoader workers


@dataclass
class RunConfig:
    """The whole pipeline's configuration."""

    name: str = "pacl"
    output_dir: str = "~/.cache/pacl_ray/runs"  # local path or pyarrow URI (s3://, gs://)
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


# --------------------------------------------------------------------------- coercion


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a type annotation, converting only lossless cases (int -> float)."""
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
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
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


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def from_dict(data: dict | None) -> RunConfig:
    """Build a :class:`RunConfig` from a nested mapping, validating every key and type."""
    return _from_dict(RunConfig, data or {})


def to_dict(cfg: Any) -> dict:
    """The nested plain-dict form of a config dataclass (YAML-serialisable)."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"train.epochs=30"`` into (["train", "epochs"], 30); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


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


def load_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (any pyarrow URI), apply overrides and validate everything."""
    data: dict = {}
    if path:
        loaded = yaml.safe_load(storage.read_text(path)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
    apply_overrides(data, list(overrides or []))
    return from_dict(data)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: RunConfig, directory: str, filename: str = "config.yaml") -> str:
    """Write the resolved config beside a run's outputs; returns the file's URI."""
    uri = storage.join(directory, filename)
    storage.write_text(uri, dump_config(cfg))
    return uri
