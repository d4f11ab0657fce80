"""Exported backbones load with timm / open_clip and reproduce the in-memory features; the export
format is read back by its owner on local paths, ``file://`` URIs and S3 (moto), and exports with
the former head names still read."""

from __future__ import annotations

import json
import os

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from pacl_ray import config
from pacl_ray.core import backbones
from pacl_ray.formats import storage
from pacl_ray.config import model_args
from pacl_ray.core.pacl_model import build_model, train_normalization
from pacl_ray.formats import export
from pacl_ray.stages.export_backbone import _timm_architecture, export_model, timm_config_json
from pacl_ray.formats.export import (ExportError, is_export_dir, load_export, load_heads, local_file,
                                     read_export_meta, read_safetensors, write_safetensors)
from moto_s3 import mock_s3  # noqa: F401 (fixture)

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
    image_proj, text_proj = load_heads(out.heads)
    assert torch.equal(image_proj.weight, model.image_proj.weight) and image_proj.bias is None
    assert torch.equal(text_proj.weight, model.text_proj.weight) and text_proj.bias is None
    assert sorted(read_safetensors(out.heads)) == ["image_proj.weight", "text_proj.weight"]  # the contract's names
    info = json.loads(storage.read_text(out.info))
    assert info["backbone"] == TINY and info["embed_dim"] == 12 and info["text_dim"] == 6
    assert info["image_dim"] == model.image_proj.in_features
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


def _export_and_read_back(directory: str) -> None:
    """Write an export under ``directory`` (any URI) and read every part back through the owner."""
    cfg = _cfg()
    model = _perturbed_model(cfg)
    out = export_model(model, cfg, directory, text_dim=6)
    assert is_export_dir(directory) and not is_export_dir(storage.join(directory, "missing"))
    assert read_export_meta(directory)["embed_dim"] == 12
    loaded = load_export(directory)
    assert torch.equal(loaded.image_proj, model.image_proj.weight) and torch.equal(loaded.text_proj, model.text_proj.weight)
    assert export.backbone_uri(directory) == out.backbone
    local = local_file(out.backbone)  # timm opens only local files
    assert os.path.isfile(local) and local_file(out.backbone) == local
    backbone = backbones.create_backbone(TINY, checkpoint=local)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone.model.eval()(images), model.backbone(images))


def test_export_reads_back_on_local_paths_and_file_uris(tmp_path):
    _export_and_read_back(str(tmp_path / "local"))
    _export_and_read_back(f"file://{tmp_path}/viauri")
    assert local_file(f"file://{tmp_path}/viauri/{export.EXPORT_BACKBONE}") == str(tmp_path / "viauri" / export.EXPORT_BACKBONE)
    assert not is_export_dir("resnet50") and not is_export_dir("")


def test_export_reads_back_on_s3(mock_s3, tmp_path, monkeypatch):
    monkeypatch.setenv(export.LOCAL_CACHE_ENV, str(tmp_path / "cache"))
    _export_and_read_back(f"{mock_s3}/runs/export")
    assert str(tmp_path / "cache" / "weights") in local_file(f"{mock_s3}/runs/export/{export.EXPORT_BACKBONE}")
    with pytest.raises(FileNotFoundError, match="weights not found"):
        local_file(f"{mock_s3}/runs/export/nothing.safetensors")


def test_exports_with_the_former_head_names_still_read(tmp_path):
    directory = tmp_path / "old"
    directory.mkdir()
    image, text = torch.randn(4, 5), torch.randn(4, 3)
    save_file({"image_head.weight": image, "text_head.weight": text}, str(directory / export.EXPORT_HEADS))
    (directory / export.EXPORT_META).write_text(json.dumps(
        {"backbone": TINY, "text_encoder": "m", "text_pooling": "mean", "text_max_length": 8, "embed_dim": 4}))
    loaded = load_export(str(directory))
    assert torch.equal(loaded.image_proj, image) and torch.equal(loaded.text_proj, text)
    image_proj, text_proj = load_heads(str(directory / export.EXPORT_HEADS))
    assert torch.equal(image_proj.weight, image) and torch.equal(text_proj.weight, text)


def test_export_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(ExportError, match=r"export.json: not found"):
        read_export_meta(str(tmp_path))
    (tmp_path / export.EXPORT_META).write_text(json.dumps({"backbone": TINY}))
    with pytest.raises(ExportError, match="missing key 'text_encoder'"):
        read_export_meta(str(tmp_path))
    (tmp_path / export.EXPORT_META).write_text(json.dumps(
        {"backbone": TINY, "text_encoder": "m", "text_pooling": "mean", "text_max_length": 8, "embed_dim": 4}))
    with pytest.raises(ExportError, match="heads.safetensors: not found"):
        load_export(str(tmp_path))
    with pytest.raises(ExportError, match="backbone.safetensors: not found"):
        export.backbone_uri(str(tmp_path))
    save_file({"image_proj.weight": torch.randn(3, 5), "text_proj.weight": torch.randn(4, 3)},
              str(tmp_path / export.EXPORT_HEADS))
    with pytest.raises(ExportError, match=r"image_proj.weight has shape \(3, 5\), expected \[embed_dim=4"):
        load_export(str(tmp_path))
    save_file({"image_proj.weight": torch.randn(4, 5)}, str(tmp_path / export.EXPORT_HEADS))
    with pytest.raises(ExportError, match="missing tensor 'text_proj.weight' or 'text_head.weight'"):
        load_export(str(tmp_path))


def test_headed_checkpoint_trains_and_exports_and_the_export_loads_in_timm(tmp_path):
    """Issue 23: a fine-tuned checkpoint with a 5-class head trains (one step) and exports; the
    export keeps a classifier of the architecture's own shape, so timm loads it both ways."""
    torch.manual_seed(0)
    finetuned = timm.create_model(TINY, pretrained=False, num_classes=5)
    initial = str(tmp_path / "finetuned.safetensors")
    write_safetensors(initial, finetuned.state_dict())
    cfg = _cfg(backbone_checkpoint=initial, backbone_kwargs={"drop_path_rate": 0.1})
    model, _ = build_model(6, **model_args(cfg))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    z_image, z_text = model(torch.randn(4, 3, 32, 32), torch.randn(4, 6))
    (-(z_image * z_text).sum()).backward()
    optimizer.step()
    model.eval()
    out = export_model(model, cfg, str(tmp_path / "export"), text_dim=6)

    meta = read_export_meta(str(tmp_path / "export"))
    assert meta["backbone_kwargs"] == {"drop_path_rate": 0.1}
    assert meta["image_size"] == 32 and meta["crop_pct"] == 1.0  # train.image_size: the whole image
    assert "drop_path_rate=0.1" in meta["load_with"]
    assert read_safetensors(out.backbone)["head.fc.weight"].shape[0] == 1000  # the 5-class head dropped
    images = torch.randn(2, 3, 32, 32)
    pooled = timm.create_model(TINY, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=out.backbone),
                               **meta["backbone_kwargs"]).eval()
    full = timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=out.backbone),
                             **meta["backbone_kwargs"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(pooled(images), model.backbone(images), rtol=0, atol=0)
        assert full(images).shape == (2, 1000)


def test_backbone_kwargs_rebuild_the_exported_architecture(tmp_path):
    cfg = _cfg(backbone_kwargs={"drop_path_rate": 0.2})
    out = export_model(_perturbed_model(cfg), cfg, str(tmp_path / "export"), text_dim=6)
    meta = read_export_meta(str(tmp_path / "export"))
    # The evaluation resolves the same architecture and transform settings from export.json.
    from pacl_ray.evaluation.resolve import resolve_backbone

    ref = resolve_backbone(cfg, str(tmp_path / "export"))
    assert ref.model_kwargs == meta["backbone_kwargs"] == {"drop_path_rate": 0.2}
    assert (ref.input_size, ref.crop_pct) == (32, 1.0)
    built = backbones.create_backbone(ref.name, checkpoint=out.backbone, input_size=ref.input_size,
                                      **ref.backbone_args())
    assert built.data_config["crop_pct"] == 1.0
    assert any(type(m).__name__ == "DropPath" for m in built.model.modules())  # drop path was built


def test_timm_export_is_a_local_dir_model_with_its_transform(tmp_path):
    """timm.create_model("local-dir:<export>") builds the architecture from config.json, loads the
    trained weights and resolves the trained input size (32 px, not the architecture's default)."""
    cfg = _cfg()
    model = _perturbed_model(cfg)
    directory = tmp_path / "export"
    export_model(model, cfg, str(directory), text_dim=6)
    loaded = timm.create_model(f"local-dir:{directory}", pretrained=True, num_classes=0).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model.backbone(images), rtol=0, atol=0)
    data_config = timm.data.resolve_model_data_config(loaded)
    default = timm.data.resolve_model_data_config(timm.create_model(TINY, pretrained=False))
    assert data_config["input_size"] == (3, 32, 32) != default["input_size"]
    assert {"mean", "std", "interpolation", "crop_pct"} <= set(data_config)
    saved = json.loads((directory / "config.json").read_text())
    assert saved["architecture"] == TINY and saved["pretrained_cfg"]["input_size"] == [3, 32, 32]
    card = (directory / "README.md").read_text()
    assert f"# {TINY} + PACL" in card and "local-dir:" in card and "(3, 32, 32)" in card


def _trained(backbone: str, tmp_path, checkpoint: bool = False, **train) -> tuple:
    """A perturbed PACL model of ``backbone`` (as after training), its config and the transform it
    trained with. ``checkpoint``: start from a local checkpoint at model.backbone_input_size 32 px
    (the default world's backbone setup); else ``train`` sets the training size."""
    model_cfg = {"backbone": backbone, "backbone_pretrained": "false", "embed_dim": 12}
    if checkpoint:
        torch.manual_seed(1)
        initial = str(tmp_path / "initial.safetensors")
        write_safetensors(initial, timm.create_model(backbone, pretrained=False).state_dict())
        model_cfg.update(backbone_pretrained="true", backbone_checkpoint=initial, backbone_input_size=32)
    cfg = config.from_dict({"model": model_cfg, "train": train})
    model, trained_backbone = build_model(6, **model_args(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval(), cfg, trained_backbone


@pytest.mark.parametrize("backbone, checkpoint, train", [
    ("test_resnet", True, {}),  # the default world's backbone: a checkpoint at backbone_input_size 32
    ("test_vit", False, {"image_size": 32}),  # a ViT resized for training (set_input_size)
    ("test_vit", True, {}),  # a fixed-size ViT built at backbone_input_size 32
])
def test_timm_config_describes_the_model_as_trained_and_loads_both_ways(tmp_path, backbone, checkpoint, train):
    """The export's config.json is the trained model's (input size, pool_size, mean/std, crop_pct,
    num_classes, model_args), and both documented loading forms -- ``local-dir:`` and the
    architecture name with ``pretrained_cfg_overlay`` -- give that config, timm's resolved transform
    at the trained size and the exported features."""
    model, cfg, trained = _trained(backbone, tmp_path, checkpoint, **train)
    directory = str(tmp_path / "export")
    out = export_model(model, cfg, directory, text_dim=6)
    trained_mean, trained_std = train_normalization(trained)
    assert trained.data_config["input_size"] == (3, 32, 32)
    registry = timm.models.get_pretrained_cfg(backbone)
    assert registry.input_size != (3, 32, 32)  # so the checks below tell the trained size apart

    saved = json.loads((tmp_path / "export" / export.TIMM_CONFIG).read_text())
    cfg_json = saved["pretrained_cfg"]
    assert saved["architecture"] == backbone and cfg_json["input_size"] == [3, 32, 32]
    assert cfg_json["pool_size"] is None  # timm's rule: the registry's pooled grid is another size's
    assert (tuple(cfg_json["mean"]), tuple(cfg_json["std"])) == (trained_mean, trained_std)
    assert cfg_json["crop_pct"] == trained.data_config["crop_pct"]
    assert cfg_json["interpolation"] == trained.data_config["interpolation"]
    assert "tag" not in cfg_json and "file" not in cfg_json and "hf_hub_id" not in cfg_json
    classifier = read_safetensors(out.backbone)[f"{registry.classifier}.weight"]
    assert saved["num_classes"] == cfg_json["num_classes"] == classifier.shape[0]
    if backbone == "test_vit":
        assert saved["model_args"]["img_size"] == [32, 32]  # rebuilds the 32 px position grid
    if train:
        assert cfg_json["crop_pct"] == 1.0  # train.image_size: the whole image

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.backbone(images)
    weights = str(tmp_path / "export" / export.TIMM_WEIGHTS)
    loaded = {
        "local-dir": timm.create_model(f"local-dir:{directory}", pretrained=True, num_classes=0),
        "helper": timm.create_model(backbone, pretrained=True, **export.timm_create_kwargs(directory, num_classes=0)),
        # The README's plain form, without pacl_ray: config.json's model_args and pretrained_cfg.
        "plain": timm.create_model(backbone, pretrained=True, **{**saved["model_args"], "num_classes": 0},
                                   pretrained_cfg_overlay=dict(file=weights, **saved["pretrained_cfg"])),
    }
    for form, timm_model in loaded.items():
        assert tuple(timm_model.pretrained_cfg["input_size"]) == (3, 32, 32), form
        resolved = timm.data.resolve_data_config({}, model=timm_model)
        # (the plain form passes config.json's JSON lists through; timm takes them as its tuples)
        assert tuple(resolved["input_size"]) == (3, 32, 32), form
        assert (tuple(resolved["mean"]), tuple(resolved["std"])) == (trained_mean, trained_std), form
        assert resolved["crop_pct"] == trained.data_config["crop_pct"], form
        transform = timm.data.create_transform(**resolved)
        assert transform(Image.new("RGB", (48, 40))).shape == (3, 32, 32), form
        with torch.no_grad():
            torch.testing.assert_close(timm_model.eval()(images), expected, rtol=0, atol=0, msg=form)
    # The overlay with the file alone keeps the architecture's registry config (the old README form).
    file_only = timm.create_model(backbone, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=weights),
                                  **{k: v for k, v in saved["model_args"].items() if k == "img_size"})
    assert tuple(file_only.pretrained_cfg["input_size"]) == registry.input_size


def test_timm_config_keeps_the_hub_tag_only_when_training_started_from_the_hub_weights():
    def tag(**model):
        cfg = config.from_dict({"model": {"backbone": "test_resnet", **model}})
        return json.loads(timm_config_json(_timm_architecture(cfg), cfg))["pretrained_cfg"].get("tag")

    assert tag(backbone_pretrained="true") == "r160_in1k"  # PACL started from test_resnet.r160_in1k
    assert tag(backbone_pretrained="false") is None
    assert tag(backbone_pretrained="true", backbone_checkpoint="/elsewhere.safetensors") is None


def test_pretrained_cfg_errors_name_the_file(tmp_path):
    with pytest.raises(ExportError, match=r"config.json: not found; only exports of timm backbones"):
        export.pretrained_cfg(str(tmp_path))
    (tmp_path / export.TIMM_CONFIG).write_text("{not json")
    with pytest.raises(ExportError, match=r"config.json: not valid JSON"):
        export.timm_create_kwargs(str(tmp_path))
    (tmp_path / export.TIMM_CONFIG).write_text(json.dumps({"architecture": TINY}))
    with pytest.raises(ExportError, match=r"config.json: missing key 'pretrained_cfg'"):
        export.pretrained_cfg(str(tmp_path))


def test_local_dir_rebuilds_the_architecture_of_backbone_kwargs(tmp_path):
    """config.json's model_args carry model.backbone_kwargs (timm leaves out drop rates), so
    ``local-dir:`` builds the trained architecture: max pooling here, not the registry's average."""
    cfg = _cfg(backbone_kwargs={"global_pool": "max", "drop_path_rate": 0.1})
    model = _perturbed_model(cfg)
    directory = tmp_path / "export"
    export_model(model, cfg, str(directory), text_dim=6)
    model_args_json = json.loads((directory / export.TIMM_CONFIG).read_text())["model_args"]
    assert model_args_json["global_pool"] == "max" and "drop_path_rate" not in model_args_json
    loaded = timm.create_model(f"local-dir:{directory}", pretrained=True, num_classes=0).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model.backbone(images), rtol=0, atol=0)
