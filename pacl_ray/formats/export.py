"""Exporting a trained PACL model in the formats its users already load.

* timm backbones: a full timm state dict (safetensors) *including a classifier*, because timm
  strict-loads the classifier whenever ``num_classes`` matches the pretrained config. The classifier
  is the initial model's (pretrained) head when it had one, else the freshly built head. Both

      timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))
      timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=path))

  load it, the second giving exactly the pooled features PACL trained.
* open_clip towers: the full CLIP state dict with the trained visual tower, loadable with
  ``open_clip.create_model_and_transforms(arch, pretrained=path)`` (and so with
  ``backbones.create_backbone("open_clip:<arch>", checkpoint=path)``).
* the projection heads (``image_head.weight`` [D, image_dim], ``text_head.weight`` [D, text_dim])
  for zero-shot use, and ``export.json`` naming the backbone, widths and the text encoder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from pacl_ray.core import backbones
from pacl_ray.formats import storage
from pacl_ray.config import RunConfig
from pacl_ray.core.pacl_model import PACLModel

BACKBONE_FILE = "backbone.safetensors"
HEADS_FILE = "heads.safetensors"
INFO_FILE = "export.json"


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


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{name}." for name in names)


def _initial_classifier_state(cfg: RunConfig, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The classifier weights of the model PACL started from, when it had trained ones."""
    import timm

    if cfg.model.backbone_checkpoint:
        path = os.path.expanduser(cfg.model.backbone_checkpoint)
        state = timm.models.load_state_dict(path, weights_only=True)  # never unpickle code
    elif cfg.model.backbone_pretrained.strip().lower() in ("1", "true", "yes", "on"):
        state = timm.create_model(cfg.model.backbone, pretrained=True).state_dict()
    else:
        return {}
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def timm_full_state(backbone: nn.Module, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The trained pooled-feature backbone as a full timm state dict with a classifier."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        full = timm.create_model(cfg.model.backbone, pretrained=False)
    prefixes = _classifier_prefixes(full)
    if hasattr(full, "set_input_size") and cfg.train.image_size:
        full.set_input_size(img_size=cfg.train.image_size)
    missing, unexpected = full.load_state_dict(backbone.state_dict(), strict=False)
    not_classifier = [k for k in missing if not k.startswith(prefixes)]
    if not_classifier or unexpected:
        raise RuntimeError(
            f"exporting {cfg.model.backbone}: trained backbone does not match a fresh timm model "
            f"(missing {not_classifier[:5]}, unexpected {list(unexpected)[:5]})"
        )
    initial_head = _initial_classifier_state(cfg, prefixes)
    if initial_head:
        full.load_state_dict(initial_head, strict=False)
    return full.state_dict()


def open_clip_full_state(backbone: nn.Module, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The initial CLIP model's state dict with the trained visual tower put in."""
    arch = cfg.model.backbone[len(backbones.OPEN_CLIP_PREFIX):]
    source = os.path.expanduser(cfg.model.backbone_checkpoint) or cfg.model.backbone_pretrained
    clip = backbones.create_clip(arch, source)
    clip.model.visual.load_state_dict(backbone.visual.state_dict())
    return clip.model.state_dict()


def export_model(model: PACLModel, cfg: RunConfig, directory: str, text_dim: int) -> ExportedModel:
    """Write backbone, heads and ``export.json`` under ``directory`` (any pyarrow URI)."""
    model = model.to("cpu").eval()
    name = cfg.model.backbone
    if backbones.is_open_clip_backbone(name):
        backbone_state = open_clip_full_state(model.backbone, cfg)
        loader = f"open_clip.create_model_and_transforms({name[len(backbones.OPEN_CLIP_PREFIX):]!r}, pretrained=<file>)"
    else:
        backbone_state = timm_full_state(model.backbone, cfg)
        loader = f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file=<file>))"
    out = ExportedModel(
        backbone=storage.join(directory, BACKBONE_FILE),
        heads=storage.join(directory, HEADS_FILE),
        info=storage.join(directory, INFO_FILE),
    )
    write_safetensors(out.backbone, backbone_state, {"backbone": name})
    heads = {"image_head.weight": model.image_head.weight, "text_head.weight": model.text_head.weight}
    write_safetensors(out.heads, heads, {"backbone": name, "text_encoder": cfg.model.text_encoder})
    info = {
        "backbone": name,
        "backbone_file": BACKBONE_FILE,
        "heads_file": HEADS_FILE,
        "load_with": loader,
        "image_size": cfg.train.image_size or cfg.model.backbone_input_size or None,
        # The initial weights, so evaluation can compare "X" with "X + PACL".
        "backbone_pretrained": cfg.model.backbone_pretrained,
        "backbone_checkpoint": cfg.model.backbone_checkpoint,
        "image_dim": int(model.image_head.in_features),
        "text_dim": int(text_dim),
        "embed_dim": int(model.image_head.out_features),
        "text_encoder": cfg.model.text_encoder,
        "text_pooling": cfg.model.text_pooling,
        "text_max_length": cfg.model.text_max_length,
        "temperature": cfg.train.temperature,
        "objective": cfg.train.objective,
    }
    storage.write_text(out.info, json.dumps(info, indent=2))
    return out


def load_heads(uri: str) -> tuple[nn.Linear, nn.Linear]:
    """The exported projection heads as bias-free ``nn.Linear`` (image, text)."""
    state = read_safetensors(uri)
    heads = []
    for key in ("image_head.weight", "text_head.weight"):
        weight = state[key]
        head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        head.weight.data.copy_(weight)
        heads.append(head)
    return heads[0], heads[1]
