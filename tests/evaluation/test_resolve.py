"""What ``--backbone`` names: export directories, weights files and model names, as local paths
and as ``file://`` URIs."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import TINY_TIMM
from pacl_ray.evaluation import resolve
from pacl_ray.formats.export import ExportError
from toy_world import cfg_for, one_torch_thread, world  # noqa: F401 (fixtures)


def test_resolve_backbone_forms(world, tmp_path):
    cfg = cfg_for(world)
    ref = resolve.resolve_backbone(cfg, world["export"])
    assert ref.export_dir and ref.name == TINY_TIMM and ref.label == f"{TINY_TIMM} + PACL"
    assert ref.checkpoint.endswith("backbone.safetensors")
    assert resolve.initial_ref(cfg, ref).pretrained == "false"
    plain = resolve.resolve_backbone(cfg, "resnet18")
    assert (plain.name, plain.pretrained, plain.checkpoint, plain.export_dir) == ("resnet18", "true", "", "")
    weights = resolve.resolve_backbone(cfg, os.path.join(world["export"], "backbone.safetensors"))
    assert weights.name == TINY_TIMM and weights.checkpoint and not weights.export_dir
    via_checkpoint = resolve.resolve_backbone(cfg, TINY_TIMM, os.path.join(world["export"], "backbone.safetensors"))
    assert via_checkpoint.export_dir == world["export"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="neither a PACL export"):
        resolve.resolve_backbone(cfg, str(tmp_path / "empty"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "export.json").write_text(json.dumps({"backbone": TINY_TIMM}))
    with pytest.raises(ExportError, match="missing key 'text_encoder'"):
        resolve.resolve_backbone(cfg, str(tmp_path / "half"))


def test_resolve_export_on_file_uris(world, tmp_path):
    """A sweep trial hands evaluation its export's backbone as a URI under the run directory."""
    cfg = cfg_for(world)
    uri = f"file://{world['export']}"
    ref = resolve.resolve_backbone(cfg, uri)
    assert ref.export_dir == uri and ref.checkpoint == f"{uri}/backbone.safetensors"
    trial = resolve.resolve_backbone(cfg, TINY_TIMM, f"{uri}/backbone.safetensors", label="trial")
    assert (trial.export_dir, trial.checkpoint, trial.label) == (uri, ref.checkpoint, "trial")
    assert resolve.initial_ref(cfg, trial).pretrained == "false"
    shutil.copy(os.path.join(world["export"], "backbone.safetensors"), tmp_path / "w.safetensors")
    weights = resolve.resolve_backbone(cfg, TINY_TIMM, f"file://{tmp_path}/w.safetensors")
    assert (weights.checkpoint, weights.export_dir) == (f"file://{tmp_path}/w.safetensors", "")
    bare = resolve.resolve_backbone(cfg, f"file://{tmp_path}/w.safetensors")
    assert (bare.name, bare.checkpoint) == (TINY_TIMM, f"file://{tmp_path}/w.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve.resolve_backbone(cfg, TINY_TIMM, f"{uri}/missing.safetensors")
