"""Exported backbones load with timm / open_clip and reproduce the in-memory features."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from pacl_ray import config
from pacl_ray.core import backbones
from pacl_ray.formats import storage
from pacl_ray.formats.export import export_model, load_heads, read_safetensors, write_safetensors
from pacl_ray.config import model_args
from pacl_ray.core.pacl_model import build_model

TINY = "test_convnext"
TINY_CLIP = "pacl-tiny-clip"


def _cfg(**model) -> config.RunConfig:
    return config.from_dict({
        "model": {"backbone": TINY, "backbone_pretrained": "false", "embed_dim": 12, **model},
        "train": {"image_size": 32},
    })


def _perturbed_model(cfg, text_dim=6):
    """A model whose backbone differs from any fresh one (as after training)."""
    model, _ = build_model(text_dim, **model_args(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def test_timm_export_loads_both_ways_and_matches_features(tmp_path):
    cfg = _cfg()
    model = _perturbed_model(cfg)
    out = export_model(model, cfg, str(tmp_path / "export"), text_dim=6)
    images = torch.randn(2, 3, 32, 32)

    pooled = timm.create_model(TINY, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=out.backbone)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pooled(images), model.backbone(images), rtol=0, atol=0)

    full = timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=out.backbone)).eval()
    assert full.num_classes == 1000
    with torch.no_grad():
        torch.testing.assert_close(full.forward_head(full.forward_features(images), pre_logits=True), model.backbone(images))

    # The project's own loader takes the same file.
    backbone = backbones.create_backbone(TINY, checkpoint=out.backbone)
    with torch.no_grad():
        torch.testing.assert_close(backbone.model.eval()(images), model.backbone(images))


def test_timm_export_keeps_initial_classifier(tmp_path):
    start = timm.create_model(TINY, pretrained=False)
    with torch.no_grad():
        start.head.fc.weight.fill_(0.125)
    initial = str(tmp_path / "initial.safetensors")
    write_safetensors(initial, start.state_dict())
    cfg = _cfg(backbone_checkpoint=initial)
    out = export_model(_perturbed_model(cfg), cfg, str(tmp_path / "export"), text_dim=6)
    state = read_safetensors(out.backbone)
    assert torch.all(state["head.fc.weight"] == 0.125)


def test_heads_and_info(tmp_path):
    cfg = _cfg()
    model = _perturbed_model(cfg, text_dim=6)
    out = export_model(model, cfg, str(tmp_path / "export"), text_dim=6)
    image_head, text_head = load_heads(out.heads)
    assert torch.equal(image_head.weight, model.image_head.weight) and image_head.bias is None
    assert torch.equal(text_head.weight, model.text_head.weight) and text_head.bias is None
    info = json.loads(storage.read_text(out.info))
    assert info["backbone"] == TINY and info["embed_dim"] == 12 and info["text_dim"] == 6
    assert info["image_dim"] == model.image_head.in_features
    assert info["text_encoder"] == cfg.model.text_encoder


def test_open_clip_export_loads_into_open_clip(tmp_path):
    cfg = config.from_dict({
        "model": {"backbone": f"open_clip:{TINY_CLIP}", "backbone_pretrained": "", "embed_dim": 8},
    })
    model = _perturbed_model(cfg, text_dim=4)
    out = export_model(model, cfg, str(tmp_path / "export"), text_dim=4)
    loaded = backbones.create_backbone(f"open_clip:{TINY_CLIP}", checkpoint=out.backbone)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(images), model.backbone(images))


def test_non_finite_tensors_are_never_exported(tmp_path):
    path = str(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="refusing to export non-finite tensors .*'w'"):
        write_safetensors(path, {"ok": torch.ones(2), "w": torch.tensor([1.0, float("nan")])})
    assert not (tmp_path / "bad.safetensors").exists()
