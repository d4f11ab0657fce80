"""The PACL export format: one owner writes it (:func:`export_model`) and reads it
(:func:`read_export_meta`, :func:`is_export_dir`, :func:`load_export`, :func:`load_heads`), always
through :mod:`pacl_ray.formats.storage`, so an export on a local path, a ``file://`` URI or object
storage (``s3://``, ``gs://``) reads the same.

An export directory holds

* ``backbone.safetensors`` (:data:`EXPORT_BACKBONE`), in the format its users already load:

  - timm backbones: a full timm state dict *including a classifier*, because timm strict-loads
    the classifier whenever ``num_classes`` matches the pretrained config. The classifier is the
    initial model's (pretrained) head when it had one, else the freshly built head. Both

        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))
        timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=path))

    load it, the second giving exactly the pooled features PACL trained.
  - open_clip towers: the full CLIP state dict with the trained visual tower, loadable with
    ``open_clip.create_model_and_transforms(arch, pretrained=path)`` (and so with
    ``backbones.create_backbone("open_clip:<arch>", checkpoint=path)``).

  timm and open_clip open only local files: :func:`local_file` copies a remote one into a local
  cache first.
* ``heads.safetensors`` (:data:`EXPORT_HEADS`): the bias-free projection heads for zero-shot use,
  ``image_proj.weight`` float32 [embed_dim, image_dim] and ``text_proj.weight`` float32
  [embed_dim, text_dim]. Exports written before the heads were renamed hold ``image_head.weight``
  / ``text_head.weight``; readers accept both (:data:`HEAD_KEYS`).
* timm backbones also get the layout of a timm model folder (Hugging Face Hub style):
  ``config.json`` (:data:`TIMM_CONFIG`, written by timm's own ``save_config_for_hf``:
  architecture, ``num_classes``, ``model_args`` and a ``pretrained_cfg`` describing the model as
  trained: input size, mean/std, interpolation, crop_pct, ``pool_size`` null at a size other
  than the architecture's) and ``model.safetensors`` (:data:`TIMM_WEIGHTS`, the same tensors as
  ``backbone.safetensors``; timm's ``local-dir:`` loader takes only that name when a folder holds
  several weight files), so ``timm.create_model("local-dir:<export dir>", pretrained=True)``
  builds the right architecture and ``timm.data.resolve_model_data_config`` the right transform.
  By architecture name, ``timm.create_model(name, pretrained=True, **timm_create_kwargs(dir))``
  does the same (:func:`pretrained_cfg` is its ``pretrained_cfg_overlay``).
* ``README.md`` (:data:`MODEL_CARD`): a short model card (what was trained, how, how to load it).
* ``export.json`` (:data:`EXPORT_META`): ``backbone``, ``text_encoder``, ``text_pooling``,
  ``text_max_length``, ``embed_dim`` (required, :data:`EXPORT_KEYS`), plus ``backbone_kwargs``
  (the ``timm.create_model`` keywords of the architecture; pass them when loading), the transform
  settings ``image_size``, ``crop_pct`` and ``interpolation`` (null = the model's own),
  ``image_dim``, ``text_dim``, the initial weights (``backbone_pretrained``,
  ``backbone_checkpoint``, so evaluation can compare "X" with "X + PACL"), ``temperature``,
  ``objective`` and a ``load_with`` hint.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import tempfile
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from pacl_ray.formats import storage

EXPORT_META = "export.json"
EXPORT_BACKBONE = "backbone.safetensors"
EXPORT_HEADS = "heads.safetensors"
TIMM_CONFIG = "config.json"
TIMM_WEIGHTS = "model.safetensors"
MODEL_CARD = "README.md"
EXPORT_KEYS = ("backbone", "text_encoder", "text_pooling", "text_max_length", "embed_dim")
# (image, text) projection weights [E, D]: the contract's name first, then the name exports had
# before the model's heads were renamed (still read).
HEAD_KEYS = (("image_proj.weight", "image_head.weight"), ("text_proj.weight", "text_head.weight"))
LOCAL_CACHE_ENV = "PACL_RAY_CACHE"


class ExportError(ValueError):
    """A PACL export directory is incomplete or inconsistent; the message names the file and key."""


@dataclass
class ExportedModel:
    """URIs of the exported files."""

    backbone: str
    heads: str
    info: str


def _plain_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, non-aliasing copies (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def write_safetensors(uri: str, state: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Raises ValueError for a tensor with NaN or inf values (a diverged model is never exported)."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{storage.redact(uri)}: refusing to export non-finite tensors ({len(bad)}, first {bad[0]!r})")
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    storage.write_bytes(uri, save_safetensors_bytes(_plain_state(state), metadata=meta))


def read_safetensors(uri: str) -> dict[str, torch.Tensor]:
    return load_safetensors_bytes(storage.read_bytes(uri))


def model_card(info: dict, data_config: dict | None) -> str:
    """``README.md`` of an export: what the backbone is, how it was trained, how to load it."""
    name = info["backbone"]
    lines = [
        "---", "library_name: timm" if data_config is not None else "library_name: open_clip",
        "tags: [image-feature-extraction, affective-computing, pacl]", "---", "",
        f"# {name} + PACL",
        "",
        f"The visual backbone `{name}` after partition-adaptive contrastive learning (PACL, ACM MM 2024)"
        f" on image-text pairs (objective `{info['objective']}`, temperature {info['temperature']},"
        f" text encoder `{info['text_encoder']}`). Initial weights: "
        f"`{info['backbone_checkpoint'] or 'pretrained=' + str(info['backbone_pretrained'])}`.",
        "",
        "## Load",
        "",
        "```python",
    ]
    if data_config is not None:
        lines += [
            "import timm",
            'model = timm.create_model("local-dir:<this folder>", pretrained=True, num_classes=0)  # pooled features',
            "transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))",
        ]
    else:
        lines += ["import open_clip", f"# {info['load_with']}"]
    lines += ["```", ""]
    if data_config is not None:
        lines += ["## Input", "",
                  f"input size {tuple(data_config.get('input_size', ()))}, mean {data_config.get('mean')}, "
                  f"std {data_config.get('std')}, interpolation {data_config.get('interpolation')}, "
                  f"crop_pct {data_config.get('crop_pct')}", ""]
    lines += ["## Files", "",
              f"- `{EXPORT_BACKBONE}`: backbone weights" + (f" (also `{TIMM_WEIGHTS}` + `{TIMM_CONFIG}` for timm)"
                                                            if data_config is not None else ""),
              f"- `{EXPORT_HEADS}`: projection heads for zero-shot use (embed dim {info['embed_dim']})",
              f"- `{EXPORT_META}`: how the export was made", ""]
    return "\n".join(lines)


def is_export_dir(uri: str) -> bool:
    """Whether ``uri`` (local path, ``file://`` or object-storage URI) is a PACL export directory,
    i.e. holds ``export.json``. False for model names such as ``resnet50``."""
    return bool(uri) and storage.exists(storage.join(uri, EXPORT_META))


def read_export_meta(directory: str) -> dict:
    """``export.json`` of a PACL export, checked for the keys zero-shot needs (:data:`EXPORT_KEYS`).

    Raises:
        ExportError: the file is missing, not JSON, or lacks a required key (named)."""
    path = storage.join(directory, EXPORT_META)
    try:
        meta = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise ExportError(f"{path}: not found; a PACL export directory holds {EXPORT_META}, "
                          f"{EXPORT_BACKBONE} and {EXPORT_HEADS}") from None
    except json.JSONDecodeError as err:
        raise ExportError(f"{path}: not valid JSON ({err})") from None
    missing = [k for k in EXPORT_KEYS if k not in meta]
    if missing:
        raise ExportError(f"{path}: missing key {missing[0]!r} (required: {', '.join(EXPORT_KEYS)})")
    return meta


def backbone_uri(directory: str) -> str:
    """The export's backbone weights (checked to exist); raises ExportError naming the file."""
    uri = storage.join(directory, EXPORT_BACKBONE)
    if not storage.exists(uri):
        raise ExportError(f"{uri}: not found (the PACL export's backbone weights)")
    return uri


def _head_weights(uri: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, text) projection weights [E, Dv], [E, Dt] from a heads file, either naming."""
    if not storage.exists(uri):
        raise ExportError(f"{uri}: not found (the PACL export's projection heads)")
    state = read_safetensors(uri)
    found = []
    for names in HEAD_KEYS:
        key = next((k for k in names if k in state), None)
        if key is None:
            raise ExportError(f"{uri}: missing tensor {names[0]!r} or {names[1]!r} (have {sorted(state)})")
        if state[key].ndim != 2:
            raise ExportError(f"{uri}: {key} has shape {tuple(state[key].shape)}, expected [embed_dim, D]")
        found.append(state[key])
    return found[0], found[1]


@dataclass
class PaclExport:
    """The zero-shot parts of a PACL export: projection heads and the frozen text encoder's name."""

    directory: str
    meta: dict
    image_proj: torch.Tensor  # float32 [E, Dv]
    text_proj: torch.Tensor  # float32 [E, Dt]


def load_export(directory: str) -> PaclExport:
    """Load ``export.json`` and ``heads.safetensors``, checking keys and shapes.

    Raises:
        ExportError: a file or key is missing, or a head's first dimension is not ``embed_dim``."""
    meta = read_export_meta(directory)
    uri = storage.join(directory, EXPORT_HEADS)
    image_proj, text_proj = _head_weights(uri)
    for name, weight in (("image_proj.weight", image_proj), ("text_proj.weight", text_proj)):
        if weight.shape[0] != int(meta["embed_dim"]):
            raise ExportError(f"{uri}: {name} has shape {tuple(weight.shape)}, expected [embed_dim="
                              f"{meta['embed_dim']}, D]")
    return PaclExport(directory, meta, image_proj.float(), text_proj.float())


def load_heads(uri: str) -> tuple[nn.Linear, nn.Linear]:
    """The exported projection heads as bias-free ``nn.Linear`` (image, text), either naming."""
    heads = []
    for weight in _head_weights(uri):
        head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        head.weight.data.copy_(weight)
        heads.append(head)
    return heads[0], heads[1]


def timm_config(directory: str) -> dict:
    """The export's timm ``config.json`` (architecture, num_classes, model_args, pretrained_cfg).

    Raises:
        ExportError: the file is missing (an open_clip export has none) or not JSON, naming it."""
    path = storage.join(directory, TIMM_CONFIG)
    try:
        config = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise ExportError(f"{path}: not found; only exports of timm backbones hold timm's {TIMM_CONFIG}") from None
    except json.JSONDecodeError as err:
        raise ExportError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config.get("pretrained_cfg"), dict):
        raise ExportError(f"{path}: missing key 'pretrained_cfg' (timm's save_config_for_hf writes it)")
    return config


def pretrained_cfg(directory: str) -> dict:
    """``pretrained_cfg_overlay`` that loads a timm export by architecture name as it was trained:
    the export's ``config.json`` ``pretrained_cfg`` (input size, mean/std, interpolation, crop_pct,
    pool_size, num_classes; JSON lists as tuples, the types of timm's own configs) with ``file``,
    a local copy of ``model.safetensors`` (:func:`local_file`). Without it the overlay
    ``dict(file=...)`` keeps the architecture's registry config, e.g. its default input size.

        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=pretrained_cfg(directory))

    Raises ExportError when ``config.json`` is missing or malformed (:func:`timm_config`)."""
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in timm_config(directory)["pretrained_cfg"].items()}
    return {**cfg, "file": local_file(storage.join(directory, TIMM_WEIGHTS))}


def timm_create_kwargs(directory: str, **overrides) -> dict:
    """All ``timm.create_model(<architecture>, pretrained=True, **kwargs)`` keywords of a timm export:
    ``config.json``'s ``model_args`` (what rebuilds the trained architecture, e.g. a resized ViT's
    ``img_size``), then ``overrides`` (e.g. ``num_classes=0`` for pooled features), and
    ``pretrained_cfg_overlay`` = :func:`pretrained_cfg`. The same model as
    ``timm.create_model("local-dir:<directory>", pretrained=True, **overrides)``, for readers that
    name the architecture (or hold the export on object storage)."""
    return {**timm_config(directory).get("model_args", {}), **overrides,
            "pretrained_cfg_overlay": pretrained_cfg(directory)}


def local_file(uri: str) -> str:
    """A local path holding the file at ``uri``, for loaders that open only local files (timm's
    ``pretrained_cfg_overlay=dict(file=...)``, open_clip's ``pretrained=``).

    Local paths (``~`` expanded) and ``file://`` URIs are returned as paths; other URIs are copied
    once into ``$PACL_RAY_CACHE/weights`` (else the system temp directory), keyed by URI, size and
    modification time, and written atomically so concurrent actors on one node share the copy.
    "" stays "". Raises FileNotFoundError naming the URI when it does not exist."""
    if not uri:
        return ""
    if "://" not in uri:
        return os.path.expanduser(uri)
    if uri.startswith("file://"):
        return storage.resolve(uri)[1]
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type.name != "File":
        raise FileNotFoundError(f"weights not found: {uri}")
    key = hashlib.sha256(json.dumps([storage.normalize(uri), info.size, info.mtime_ns]).encode()).hexdigest()[:16]
    base = os.environ.get(LOCAL_CACHE_ENV) or tempfile.gettempdir()
    target = os.path.join(os.path.expanduser(base), "weights", key, posixpath.basename(path))
    if not os.path.isfile(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp-{os.getpid()}"
        with fs.open_input_stream(path) as source, open(tmp, "wb") as sink:
            while chunk := source.read(1 << 24):
                sink.write(chunk)
        os.replace(tmp, target)
    return target
