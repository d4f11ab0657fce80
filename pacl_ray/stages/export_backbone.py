"""The train stage's export step: a trained PACL model and its run config -> the export format
(:mod:`pacl_ray.formats.export`, which owns the files and reads them back). Here the run config
decides what is written (architecture, its kwargs and checkpoint, the trained transform), so the
format module itself takes explicit values only."""

from __future__ import annotations

import json
import os
import tempfile

import torch
from torch import nn

from pacl_ray.config import RunConfig, trained_transform_args
from pacl_ray.core import backbones
from pacl_ray.core.pacl_model import PACLModel
from pacl_ray.formats import storage
from pacl_ray.formats.export import (
    EXPORT_BACKBONE, EXPORT_HEADS, EXPORT_META, HEAD_KEYS, MODEL_CARD, TIMM_CONFIG, TIMM_WEIGHTS, ExportedModel,
    local_file, model_card, write_safetensors,
)


def _initial_classifier_state(cfg: RunConfig, full: nn.Module, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The classifier weights of the model PACL started from, when it had trained ones of the
    architecture's shape. A checkpoint's classifier of another shape (e.g. a 5-class ``fc`` from
    fine-tuning) is dropped, as it was when the backbone was built
    (:func:`pacl_ray.core.backbones.load_features_checkpoint`): the export keeps the fresh head."""
    import timm

    if cfg.model.backbone_checkpoint:
        path = local_file(cfg.model.backbone_checkpoint)
        state = timm.models.load_state_dict(path, weights_only=True)  # never unpickle code
    elif cfg.model.backbone_pretrained.strip().lower() in ("1", "true", "yes", "on"):
        state = timm.create_model(cfg.model.backbone, pretrained=True,
                                  **backbones.timm_kwargs(cfg.model.backbone_kwargs)).state_dict()
    else:
        return {}
    expected = full.state_dict()
    head = {k: v for k, v in state.items() if k.startswith(prefixes)}
    if any(k not in expected or tuple(v.shape) != tuple(expected[k].shape) for k, v in head.items()):
        return {}
    return head


def timm_full_state(backbone: nn.Module, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The trained pooled-feature backbone as a full timm state dict with a classifier, of the
    architecture ``timm.create_model(model.backbone, **model.backbone_kwargs)``."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        full = timm.create_model(cfg.model.backbone, pretrained=False,
                                 **backbones.timm_kwargs(cfg.model.backbone_kwargs))
    prefixes = backbones.classifier_prefixes(full)
    if hasattr(full, "set_input_size") and cfg.train.image_size:
        full.set_input_size(img_size=cfg.train.image_size)
    missing, unexpected = full.load_state_dict(backbone.state_dict(), strict=False)
    not_classifier = [k for k in missing if not k.startswith(prefixes)]
    if not_classifier or unexpected:
        raise RuntimeError(
            f"exporting {cfg.model.backbone}: trained backbone does not match a fresh timm model "
            f"(missing {not_classifier[:5]}, unexpected {list(unexpected)[:5]})"
        )
    initial_head = _initial_classifier_state(cfg, full, prefixes)
    if initial_head:
        full.load_state_dict(initial_head, strict=False)
    return full.state_dict()


def timm_config_json(cfg: RunConfig) -> str:
    """timm's ``config.json`` for the exported backbone: its ``pretrained_cfg`` with the input size
    PACL trained at (``train.image_size``, else ``model.backbone_input_size``, else the
    architecture's), through timm's own ``save_config_for_hf``."""
    import timm
    from timm.models._hub import save_config_for_hf  # timm's own writer (not re-exported by timm.models)

    size = cfg.train.image_size or cfg.model.backbone_input_size
    overlay = dict(input_size=(3, size, size)) if size else {}
    model = timm.create_model(cfg.model.backbone, pretrained=False, pretrained_cfg_overlay=overlay)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, TIMM_CONFIG)
        save_config_for_hf(model, path, data_config={"input_size": (3, size, size)} if size else None)
        with open(path) as handle:
            return handle.read()


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
        extra = "".join(f", {k}={v!r}" for k, v in cfg.model.backbone_kwargs.items())
        loader = f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file=<file>){extra})"
    out = ExportedModel(
        backbone=storage.join(directory, EXPORT_BACKBONE),
        heads=storage.join(directory, EXPORT_HEADS),
        info=storage.join(directory, EXPORT_META),
    )
    transform = trained_transform_args(cfg)
    write_safetensors(out.backbone, backbone_state, {"backbone": name})
    heads = {HEAD_KEYS[0][0]: model.image_proj.weight, HEAD_KEYS[1][0]: model.text_proj.weight}
    write_safetensors(out.heads, heads, {"backbone": name, "text_encoder": cfg.model.text_encoder})
    info = {
        "backbone": name,
        "backbone_file": EXPORT_BACKBONE,
        "heads_file": EXPORT_HEADS,
        "load_with": loader,
        "image_size": transform["input_size"] or None,
        # The architecture and transform settings, so readers re-create exactly what was trained.
        "backbone_kwargs": dict(cfg.model.backbone_kwargs),
        "crop_pct": transform["crop_pct"],
        "interpolation": transform["interpolation"],
        # The initial weights, so evaluation can compare "X" with "X + PACL".
        "backbone_pretrained": cfg.model.backbone_pretrained,
        "backbone_checkpoint": cfg.model.backbone_checkpoint,
        "image_dim": int(model.image_proj.in_features),
        "text_dim": int(text_dim),
        "embed_dim": int(model.image_proj.out_features),
        "text_encoder": cfg.model.text_encoder,
        "text_pooling": cfg.model.text_pooling,
        "text_max_length": cfg.model.text_max_length,
        "temperature": cfg.train.temperature,
        "objective": cfg.train.objective,
    }
    data_config = None
    if not backbones.is_open_clip_backbone(name):
        config_text = timm_config_json(cfg)
        data_config = json.loads(config_text).get("pretrained_cfg", {})
        storage.write_text(storage.join(directory, TIMM_CONFIG), config_text)
        write_safetensors(storage.join(directory, TIMM_WEIGHTS), backbone_state, {"backbone": name})
        info["load_with_timm"] = 'timm.create_model("local-dir:<export dir>", pretrained=True)'
    storage.write_text(storage.join(directory, MODEL_CARD), model_card(info, data_config))
    storage.write_text(out.info, json.dumps(info, indent=2))
    return out


# --------------------------------------------------------------------------- reading
