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


def _starts_from_hub(cfg: RunConfig) -> bool:
    """Whether PACL started from timm's hub weights of the architecture (not a checkpoint, not random)."""
    return not cfg.model.backbone_checkpoint and cfg.model.backbone_pretrained.strip().lower() in (
        "1", "true", "yes", "on")


def _initial_classifier_state(cfg: RunConfig, full: nn.Module, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The classifier weights of the model PACL started from, when it had trained ones of the
    architecture's shape. A checkpoint's classifier of another shape (e.g. a 5-class ``fc`` from
    fine-tuning) is dropped, as it was when the backbone was built
    (:func:`pacl_ray.core.backbones.load_features_checkpoint`): the export keeps the fresh head."""
    import timm

    if cfg.model.backbone_checkpoint:
        path = local_file(cfg.model.backbone_checkpoint)
        state = timm.models.load_state_dict(path, weights_only=True)  # never unpickle code
    elif _starts_from_hub(cfg):
        state = timm.create_model(cfg.model.backbone, pretrained=True,
                                  **backbones.timm_kwargs(cfg.model.backbone_kwargs)).state_dict()
    else:
        return {}
    expected = full.state_dict()
    head = {k: v for k, v in state.items() if k.startswith(prefixes)}
    if any(k not in expected or tuple(v.shape) != tuple(expected[k].shape) for k, v in head.items()):
        return {}
    return head


def _timm_architecture(cfg: RunConfig) -> nn.Module:
    """A fresh timm model of the trained architecture with a classifier, built as the trained
    backbone was (:func:`pacl_ray.core.backbones.create_backbone`): ``model.backbone_kwargs``, and a
    fixed-size model (ViT) at ``model.backbone_input_size`` px, which timm derives from the
    ``input_size`` overlay the backbone was built with, passed here as timm's own ``img_size``
    keyword so that ``pretrained_cfg`` stays the architecture's (the source weights' metadata,
    which timm's ``save_config_for_hf`` compares the exported input size against); then resized to
    ``train.image_size`` as training did."""
    import timm

    kwargs = backbones.timm_kwargs(cfg.model.backbone_kwargs)
    registry = timm.models.get_pretrained_cfg(cfg.model.backbone)
    if cfg.model.backbone_input_size and registry is not None and registry.fixed_input_size:
        kwargs.setdefault("img_size", cfg.model.backbone_input_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        full = timm.create_model(cfg.model.backbone, pretrained=False, **kwargs)
    if hasattr(full, "set_input_size") and cfg.train.image_size:
        full.set_input_size(img_size=cfg.train.image_size)
    return full


def timm_full_model(backbone: nn.Module, cfg: RunConfig) -> nn.Module:
    """The trained pooled-feature backbone as a full timm model with a classifier (the initial
    model's when it had one of the architecture's shape, else the fresh one), of the architecture
    ``timm.create_model(model.backbone, **model.backbone_kwargs)``. Raises RuntimeError naming the
    keys when the trained backbone does not match that architecture."""
    full = _timm_architecture(cfg)
    prefixes = backbones.classifier_prefixes(full)
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
    return full.eval()


def timm_full_state(backbone: nn.Module, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """:func:`timm_full_model`'s state dict (what ``backbone.safetensors`` holds)."""
    return timm_full_model(backbone, cfg).state_dict()


def trained_data_config(full: nn.Module, cfg: RunConfig) -> dict:
    """The transform the backbone was trained and is evaluated with: timm's resolved data config
    (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``) from
    :func:`pacl_ray.config.trained_transform_args` through the same
    :func:`pacl_ray.core.backbones.data_config` that built the training transforms, so ``mean`` /
    ``std`` are the normalisation training used (:func:`pacl_ray.core.pacl_model.train_normalization`)."""
    transform = trained_transform_args(cfg)
    return backbones.data_config(full, transform["input_size"], transform["crop_pct"], transform["interpolation"])


def timm_config_json(full: nn.Module, cfg: RunConfig) -> str:
    """timm's ``config.json`` for the exported model ``full`` (:func:`timm_full_model`), written by
    timm's own ``save_config_for_hf`` (what ``push_to_hf_hub`` / ``save_for_hf`` write) with
    ``data_config`` = :func:`trained_data_config`. So its ``pretrained_cfg`` describes the model as
    trained: ``input_size``, ``mean``/``std``, ``interpolation``, ``crop_pct`` and ``crop_mode`` of
    training; ``pool_size`` null when the input size is not the architecture's (timm's rule: the
    registry's pooled grid belongs to another size); ``num_classes`` of the exported classifier;
    ``model_args`` the keywords that rebuild the architecture (``backbone_kwargs`` other than drop
    rates, ``img_size`` of a resized ViT). One change to timm's output: the registry's ``tag``
    (e.g. ``r160_in1k``, "the source weights") is dropped unless PACL started from those hub
    weights (``model.backbone_pretrained`` without ``model.backbone_checkpoint``)."""
    from timm.models._hub import save_config_for_hf  # timm's own writer (not re-exported by timm.models)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, TIMM_CONFIG)
        save_config_for_hf(full, path, data_config=trained_data_config(full, cfg))
        with open(path) as handle:
            config = json.load(handle)
    if not _starts_from_hub(cfg):
        config["pretrained_cfg"].pop("tag", None)
    return json.dumps(config, indent=2)


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
        full = timm_full_model(model.backbone, cfg)
        backbone_state = full.state_dict()
        extra = "".join(f", {k}={v!r}" for k, v in cfg.model.backbone_kwargs.items())
        # The overlay with the file alone would keep the architecture's registry pretrained_cfg
        # (its default input size): the helper adds config.json's pretrained_cfg and model_args.
        loader = (f"timm.create_model({name!r}, pretrained=True, "
                  f"**pacl_ray.formats.export.timm_create_kwargs(<export dir>){extra})")
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
        config_text = timm_config_json(full, cfg)
        data_config = json.loads(config_text).get("pretrained_cfg", {})
        storage.write_text(storage.join(directory, TIMM_CONFIG), config_text)
        write_safetensors(storage.join(directory, TIMM_WEIGHTS), backbone_state, {"backbone": name})
        info["load_with_timm"] = 'timm.create_model("local-dir:<export dir>", pretrained=True)'
    storage.write_text(storage.join(directory, MODEL_CARD), model_card(info, data_config))
    storage.write_text(out.info, json.dumps(info, indent=2))
    return out


# --------------------------------------------------------------------------- reading
