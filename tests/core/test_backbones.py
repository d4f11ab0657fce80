"""pacl_ray.core.backbones.autocast: the one mixed-precision helper of every stage."""

from __future__ import annotations

import contextlib
import pathlib

import pytest
import torch

from pacl_ray.core.backbones import autocast, autocast_dtype


def test_precision_names_map_to_dtypes_on_cuda_and_float32_on_cpu():
    assert autocast_dtype("bf16", "cuda") is torch.bfloat16
    assert autocast_dtype("fp16", torch.device("cuda:0")) is torch.float16
    assert autocast_dtype("fp32", "cuda") is None
    assert autocast_dtype("bf16", "cpu") is None  # CPU always runs float32
    with pytest.raises(ValueError, match="precision 'bf61': expected one of bf16, fp16, fp32"):
        autocast_dtype("bf61", "cpu")


def test_cpu_and_fp32_are_no_ops():
    assert isinstance(autocast("cpu", "bf16"), contextlib.nullcontext)
    assert isinstance(autocast(torch.device("cuda"), "fp32"), contextlib.nullcontext)
    a = torch.randn(4, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_autocast_runs_matmuls_in_the_named_dtype():
    a = torch.randn(4, 4, device="cuda")
    with autocast(a.device, "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast("cuda", "fp16"):
        assert (a @ a).dtype == torch.float16


def test_no_module_calls_torch_autocast_itself():
    root = pathlib.Path(__file__).resolve().parents[2] / "pacl_ray"
    callers = [str(p.relative_to(root)) for p in root.rglob("*.py")
               if "torch.autocast(" in p.read_text() and p.name != "backbones.py"]
    assert callers == []


# --------------------------------------------------------------------------- timm backbones (issue 23)


def _image(size: int = 32, seed: int = 0):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_eval_transform_at_32px_with_crop_pct_one_does_no_resize_and_crop():
    import numpy as np

    from pacl_ray.core.backbones import create_backbone

    image = _image(32)
    default = create_backbone("test_resnet", "false", input_size=32)
    assert default.data_config["crop_pct"] < 1.0  # the model's own crop: resize to 33, crop 32
    whole = create_backbone("test_resnet", "false", input_size=32, crop_pct=1.0, interpolation="bicubic")
    assert whole.data_config["crop_pct"] == 1.0 and whole.data_config["interpolation"] == "bicubic"
    # At crop_pct 1.0 a 32 px image comes through pixel for pixel: only to-tensor and normalisation.
    mean, std = (np.asarray(whole.data_config[k], np.float32)[:, None, None] for k in ("mean", "std"))
    expected = (np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0 - mean) / std
    np.testing.assert_allclose(whole.eval_transform(image).numpy(), expected, atol=1e-5)
    assert not np.allclose(default.eval_transform(image).numpy(), expected, atol=1e-3)


def test_train_image_size_equal_to_the_input_size_still_evaluates_the_whole_image():
    from pacl_ray.core.pacl_model import build_backbone

    same = build_backbone("test_resnet", "false", input_size=32, image_size=32)
    assert same.image_size == 32 and same.data_config["crop_pct"] == 1.0
    kept = build_backbone("test_resnet", "false", input_size=32, image_size=32, crop_pct=0.5)
    assert kept.data_config["crop_pct"] == 0.5  # an explicit model.crop_pct wins
    plain = build_backbone("test_resnet", "false", input_size=32, crop_pct=1.0, interpolation="bicubic")
    assert plain.data_config["interpolation"] == "bicubic" and plain.data_config["crop_pct"] == 1.0


def test_backbone_kwargs_reach_timm(monkeypatch):
    import timm

    from pacl_ray.core import backbones

    calls = []
    real = timm.create_model

    def spy(name, *args, **kwargs):
        calls.append(kwargs)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    built = backbones.create_backbone("test_resnet", "false", input_size=32,
                                      model_kwargs={"drop_path_rate": 0.2, "stem_type": ""})
    assert calls[-1]["drop_path_rate"] == 0.2 and calls[-1]["stem_type"] == "" and calls[-1]["num_classes"] == 0
    # test_resnet's own stem is deep (conv1.0, conv1.1, ...): the keyword built a plain one
    assert "conv1.weight" in built.model.state_dict() and "conv1.0.weight" not in built.model.state_dict()
    with pytest.raises(ValueError, match="model.backbone_kwargs.num_classes"):
        backbones.create_backbone("test_resnet", "false", model_kwargs={"num_classes": 5})
    with pytest.raises(ValueError, match="timm backbones only"):
        backbones.create_backbone("open_clip:test-tiny", "", model_kwargs={"drop_path_rate": 0.1})


def test_headed_checkpoint_loads_with_the_classifier_dropped_and_a_mismatch_names_file_and_key(tmp_path):
    import timm
    from safetensors.torch import save_file

    from pacl_ray.core import backbones

    torch.manual_seed(0)
    headed = timm.create_model("test_resnet", pretrained=False, num_classes=5)  # a fine-tuned 5-class fc
    path = tmp_path / "headed.safetensors"
    save_file({k: v.contiguous() for k, v in headed.state_dict().items()}, str(path))
    built = backbones.create_backbone("test_resnet", "true", checkpoint=str(path), input_size=32)
    features = {k: v for k, v in headed.state_dict().items() if not k.startswith("fc.")}
    for key, value in built.model.state_dict().items():
        assert torch.equal(value, features[key]), key
    backbones.check_backbone("test_resnet", str(path))

    # Another architecture (a plain stem) does not match: the error names the file and first key.
    with pytest.raises(backbones.CheckpointMismatchError, match=r"headed\.safetensors.*first mismatching key 'conv1\.weight'"):
        backbones.check_backbone("test_resnet", str(path), {"stem_type": ""})
    truncated = tmp_path / "truncated.pt"
    torch.save({k: v for k, v in headed.state_dict().items() if k != "bn1.weight"}, truncated)
    with pytest.raises(backbones.CheckpointMismatchError, match=r"truncated\.pt.*'bn1\.weight' is missing"):
        backbones.create_backbone("test_resnet", "true", checkpoint=str(truncated))


# --------------------------------------------------------------------------- load errors (offline, not cached)


def _offline_error():
    from huggingface_hub.errors import LocalEntryNotFoundError

    return LocalEntryNotFoundError(
        "An error happened while trying to locate the file on the Hub and we cannot find the requested files "
        "in the local cache. Please check your connection and try again or make sure your Internet connection is on.")


def _assert_one_clear_line(err, *fragments):
    text = str(err)
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    assert "Fix:" in text


def test_timm_weights_not_cached_offline_is_a_model_load_error_naming_model_and_key(monkeypatch):
    import timm

    from pacl_ray.core.backbones import ModelLoadError, create_backbone

    real = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        if pretrained:  # what timm raises through huggingface_hub offline without the weights cached
            raise _offline_error()
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        create_backbone("test_resnet", "true", input_size=32)
    _assert_one_clear_line(info.value, "model.backbone='test_resnet'", "model.backbone_pretrained='true'",
                           "not in the local cache", "HF_HUB_OFFLINE=1", "model.backbone_checkpoint",
                           "local-dir:", "HF_HOME")
    assert isinstance(info.value, ValueError)
    # random initialisation never touches the Hub
    assert create_backbone("test_resnet", "false", input_size=32).num_features > 0


def test_open_clip_tag_not_cached_is_a_model_load_error_without_a_root_log_line(monkeypatch, capfd):
    import logging

    import open_clip.factory

    from pacl_ray.core.backbones import ModelLoadError, create_backbone, create_clip

    def download_pretrained(cfg, cache_dir=None):
        raise _offline_error()

    # open_clip's own code then logs "Failed to download weights ..." on the root logger and raises
    # RuntimeError, as offline without the weights cached.
    monkeypatch.setattr(open_clip.factory, "download_pretrained", download_pretrained)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    root = logging.getLogger()
    handlers = list(root.handlers)
    with pytest.raises(ModelLoadError) as info:
        create_clip("ViT-B-32", "openai", config_key="partition.clip_model", weights_key="partition.clip_pretrained")
    _assert_one_clear_line(info.value, "partition.clip_model='ViT-B-32'", "partition.clip_pretrained='openai'",
                           "not in the local cache", "Hub could not be reached", "local open_clip checkpoint")
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(ModelLoadError) as info:
        create_backbone("open_clip:ViT-B-32", "openai")
    _assert_one_clear_line(info.value, "model.backbone='open_clip:ViT-B-32'", "model.backbone_pretrained='openai'")
    captured = capfd.readouterr()
    assert "ERROR:root" not in captured.err + captured.out
    assert "Failed to download" not in captured.err + captured.out
    assert root.handlers == handlers and not root.filters  # nothing installed for good


def test_other_open_clip_errors_keep_their_reason(monkeypatch):
    from pacl_ray.core.backbones import ModelLoadError, create_clip

    with pytest.raises(ModelLoadError) as info:
        create_clip("no-such-arch", "", config_key="partition.clip_model")
    _assert_one_clear_line(info.value, "partition.clip_model='no-such-arch'", "RuntimeError: ")
    assert "local cache" not in str(info.value)


def test_hf_text_encoder_not_cached_is_a_model_load_error_naming_the_key(monkeypatch):
    import transformers

    from pacl_ray.core.backbones import ModelLoadError, TextEncoder

    def from_pretrained(path, *args, **kwargs):
        try:
            raise _offline_error()
        except FileNotFoundError as err:  # how transformers re-raises the hub's error
            raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find "
                          f"them in the cached files.\nCheck your internet connection for {path}.") from err

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        TextEncoder("org/some-encoder")
    _assert_one_clear_line(info.value, "model.text_encoder='org/some-encoder'", "not in the local cache",
                           "local directory")
    with pytest.raises(ModelLoadError, match=r"^partition\.sentiment_model='org/x'"):
        TextEncoder("org/x", config_key="partition.sentiment_model")


def test_cli_reports_a_model_load_error_in_one_line_with_exit_2(monkeypatch, capsys):
    from pacl_ray import cli
    from pacl_ray.core.backbones import model_load_error

    def fail(args):
        raise model_load_error("resnet50", "model.backbone", _offline_error(), "set model.backbone_checkpoint")

    monkeypatch.setitem(cli.COMMAND_HANDLERS, "tune", fail)
    assert cli.main(["tune"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("pacl-ray tune: ModelLoadError: model.backbone='resnet50'")
