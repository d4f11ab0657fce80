"""The PACL model: backbone + bias-free projection heads with unit-norm outputs."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from pacl_ray import config
from pacl_ray.config import model_args
from timm.data import IMAGENET_DEFAULT_MEAN

from pacl_ray.core.pacl_model import (
    OnePassRandomResizedCrop, PACLModel, build_model, head_parameters, train_normalization, train_transform,
)

TINY = "test_convnext"  # LayerNorm only, any input size


def _cfg(**train) -> config.RunConfig:
    return config.from_dict({
        "model": {"backbone": TINY, "backbone_pretrained": "false", "embed_dim": 12},
        "train": {"image_size": 32, **train},
    })


def test_outputs_are_unit_norm_projections():
    model, backbone = build_model(7, **model_args(_cfg()))
    z_image, z_text = model(torch.randn(3, 3, 32, 32), torch.randn(3, 7))
    assert z_image.shape == z_text.shape == (3, 12)
    torch.testing.assert_close(z_image.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(z_text.norm(dim=-1), torch.ones(3))
    assert model.image_proj.bias is None and model.text_proj.bias is None
    assert model.image_proj.in_features == backbone.num_features


def test_text_head_is_a_linear_map_of_cached_features():
    model = PACLModel(torch.nn.Flatten(), image_dim=4, text_dim=3, embed_dim=2)
    feats = torch.randn(5, 3)
    expected = feats @ model.text_proj.weight.T
    torch.testing.assert_close(model.encode_text(feats), expected / expected.norm(dim=-1, keepdim=True))


def test_checkpoints_with_the_former_head_names_still_load():
    model = PACLModel(torch.nn.Flatten(), image_dim=4, text_dim=3, embed_dim=2)
    old = {"image_head.weight": torch.randn(2, 4), "text_head.weight": torch.randn(2, 3)}
    model.load_state_dict(old)  # strict: nothing missing, nothing unexpected
    assert torch.equal(model.image_proj.weight, old["image_head.weight"])
    assert torch.equal(model.text_proj.weight, old["text_head.weight"])
    assert sorted(model.state_dict()) == ["image_proj.weight", "text_proj.weight"]


def test_gradients_reach_backbone_and_both_heads():
    model, _ = build_model(5, **model_args(_cfg()))
    z_image, z_text = model(torch.randn(2, 3, 32, 32), torch.randn(2, 5))
    (z_image @ z_text.T).sum().backward()
    assert all(p.grad is not None for p in head_parameters(model))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_build_is_seeded():
    a, _ = build_model(5, **model_args(_cfg()))
    b, _ = build_model(5, **model_args(_cfg()))
    for (name, pa_), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa_, pb), name


def test_image_size_override_sets_transforms():
    _, backbone = build_model(5, **model_args(_cfg()))
    image = Image.new("RGB", (50, 70), color=(10, 200, 30))
    assert backbone.image_size == 32
    assert tuple(backbone.train_transform(image).shape) == (3, 32, 32)
    assert backbone.train_transform(image).dtype == torch.uint8
    assert tuple(backbone.eval_transform(image).shape) == (3, 32, 32)


def test_open_clip_rejects_image_size_override():
    cfg = config.from_dict({
        "model": {"backbone": "open_clip:pacl-tiny-clip", "backbone_pretrained": ""},
        "train": {"image_size": 64},
    })
    with pytest.raises(ValueError, match="train.image_size"):
        build_model(4, **model_args(cfg))


def test_explicit_arguments_without_a_config():
    model, backbone = build_model(6, backbone=TINY, pretrained="false", image_size=32, embed_dim=4, seed=1)
    assert model.text_proj.out_features == 4 and backbone.image_size == 32
    with pytest.raises(ValueError, match="crop_scale"):
        build_model(6, backbone=TINY, pretrained="false", crop_scale=(0.9, 0.5))


def test_core_takes_explicit_arguments_not_the_config():
    import ast
    import pathlib

    core = pathlib.Path(__file__).resolve().parents[2] / "pacl_ray" / "core"
    importers = []
    for path in core.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else [])
            importers += [path.name for n in names if n.startswith("pacl_ray.config")]
    assert importers == []


# --------------------------------------------------------------------------- training augmentation (SPEC Training recipe)


def _ops(transform) -> list:
    return list(getattr(transform, "transforms", [transform]))


@pytest.mark.parametrize("backbone, pretrained", [(TINY, "false"), ("open_clip:pacl-tiny-clip", "")])
def test_augmentation_is_the_same_for_timm_and_open_clip_and_keeps_colour(backbone, pretrained):
    from torchvision import transforms as T

    cfg = config.from_dict({"model": {"backbone": backbone, "backbone_pretrained": pretrained}})
    _, built = build_model(4, **model_args(cfg))
    ops = _ops(built.train_transform)
    names = [type(op).__name__ for op in ops]
    # uint8 out (timm's use_prefetcher form): normalisation is the training step's, on the device
    assert names == ["OnePassRandomResizedCrop", "RandomHorizontalFlip", "MaybePILToTensor"], names
    assert tuple(ops[0].scale) == (0.5, 1.0) and ops[1].p == 0.5
    assert not any(isinstance(op, (T.ColorJitter, T.Grayscale, T.RandomGrayscale)) for op in ops)
    # a uniform colour survives every crop and flip exactly: the augmentation never changes colour
    mean, std = train_normalization(built)
    rgb = (200, 40, 90)
    expected = (torch.tensor(rgb, dtype=torch.float32) / 255 - torch.tensor(mean)) / torch.tensor(std)
    image = Image.new("RGB", (61, 47), color=rgb)
    for seed in range(4):
        torch.manual_seed(seed)
        out = built.train_transform(image)
        assert out.shape == (3, built.image_size, built.image_size) and out.dtype == torch.uint8
        assert torch.equal(out, torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand_as(out))
        normalised = (out.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        torch.testing.assert_close(normalised, expected.view(3, 1, 1).expand_as(out), atol=1e-5, rtol=0)


def test_open_clip_tower_keeps_its_own_normalisation():
    cfg = config.from_dict({"model": {"backbone": "open_clip:pacl-tiny-clip", "backbone_pretrained": ""}})
    _, built = build_model(4, **model_args(cfg))
    mean, std = train_normalization(built)
    eval_norm = _ops(built.eval_transform)[-1]
    torch.testing.assert_close(torch.tensor(mean), torch.as_tensor(eval_norm.mean).float())
    torch.testing.assert_close(torch.tensor(std), torch.as_tensor(eval_norm.std).float())
    assert torch.tensor(mean).ne(torch.tensor(IMAGENET_DEFAULT_MEAN)).any()  # CLIP's, not ImageNet's


def test_timm_backbone_normalises_with_its_data_config():
    _, built = build_model(4, **model_args(_cfg()))
    assert train_normalization(built) == (tuple(built.data_config["mean"]), tuple(built.data_config["std"]))
    eval_norm = _ops(built.eval_transform)[-1]
    torch.testing.assert_close(torch.tensor(train_normalization(built)[1]), torch.as_tensor(eval_norm.std).float())


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Texture with edges everywhere, so any resampling difference shows."""
    import numpy as np

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
    grain = rng.integers(-30, 30, (height, width, 3))
    big = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.int64)
    return Image.fromarray(np.clip(big + grain, 0, 255).astype(np.uint8))


def test_one_pass_crop_is_timms_crop_inside_and_differs_only_within_the_filter_reach_of_its_edges():
    """Same random draws as timm's RandomResizedCropAndInterpolation (crop and interpolation), and
    the same pixels except within 2 output px (bicubic's reach when downscaling) of the crop's
    edges, where PIL's box resample reads the real neighbours instead of repeating the edge."""
    import numpy as np
    from timm.data.transforms import RandomResizedCropAndInterpolation

    image = _photo(160, 120)
    border = 3
    for interpolation in ("bicubic", "bilinear", "random"):
        timm_crop = RandomResizedCropAndInterpolation(48, scale=(0.5, 1.0), interpolation=interpolation)
        one_pass = OnePassRandomResizedCrop(timm_crop)
        differs_at_edge = False
        for seed in range(12):
            random.seed(seed)
            a = np.asarray(timm_crop(image), dtype=np.int64)
            after_timm = random.getstate()
            random.seed(seed)
            b = np.asarray(one_pass(image), dtype=np.int64)
            assert random.getstate() == after_timm  # the same draws, so the same crop per seed
            assert a.shape == b.shape == (48, 48, 3)
            inner = np.abs(a - b)[border:-border, border:-border]
            assert inner.max() <= 1, (interpolation, seed, inner.max())
            differs_at_edge |= bool(np.abs(a - b).max() > 1)
        assert differs_at_edge  # the documented difference is real, not vacuous


def test_float_transform_is_the_uint8_one_normalised():
    """``normalize=(mean, std)`` ends in ToTensor + Normalize over the same augmentation."""
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    image = _photo(96, 80)
    as_uint8 = train_transform(32, crop_scale=(0.5, 1.0))
    as_float = train_transform(32, crop_scale=(0.5, 1.0), normalize=(mean, std))
    assert [type(op).__name__ for op in _ops(as_float)][-2:] == ["MaybeToTensor", "Normalize"]
    for seed in range(4):
        random.seed(seed)
        torch.manual_seed(seed)  # timm/torchvision transforms draw from both generators
        u8 = as_uint8(image)
        random.seed(seed)
        torch.manual_seed(seed)
        f32 = as_float(image)
        expected = (u8.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        torch.testing.assert_close(f32, expected, atol=1e-6, rtol=0)


def test_colour_jitter_only_when_asked():
    from torchvision import transforms as T

    _, built = build_model(4, **model_args(_cfg(color_jitter=0.4, hflip=0.0, crop_scale=[0.9, 1.0])))
    ops = _ops(built.train_transform)
    assert any(isinstance(op, T.ColorJitter) for op in ops)
    assert not any(isinstance(op, T.RandomHorizontalFlip) for op in ops) and tuple(ops[0].scale) == (0.9, 1.0)
