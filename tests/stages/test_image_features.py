"""The shared frozen image-feature extractor: pixels and image paths give the same features, and
weights are read from URIs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_TIMM
from pacl_ray.core.backbones import create_backbone
from pacl_ray.stages.image_features import ImageFeatureExtractor


def test_pixels_and_paths_give_the_backbone_features(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "weights.safetensors"
    from safetensors.torch import save_file

    reference = create_backbone(TINY_TIMM, "false")
    save_file({k: v.contiguous() for k, v in reference.model.state_dict().items()}, str(weights))
    extractor = ImageFeatureExtractor(TINY_TIMM, "false", checkpoint=f"file://{weights}", feature_column="f")
    paths = []
    for i, colour in enumerate([(250, 10, 10), (10, 10, 250)]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (24, 24), colour).save(paths[-1])
    pixels = np.stack([extractor.eval_transform(Image.open(p).convert("RGB")).numpy() for p in paths])

    from_paths = extractor({"path": np.array(paths, dtype=object), "row": np.array([0, 1])})
    from_pixels = extractor({"pixels": pixels, "id": np.array(["a", "b"], dtype=object)})
    assert sorted(from_paths) == ["f", "row"] and sorted(from_pixels) == ["f", "id"]
    with torch.no_grad():
        expected = reference.model.eval()(torch.from_numpy(pixels)).numpy()
    assert from_paths["f"].shape == (2, extractor.num_features) and from_paths["f"].dtype == np.float32
    np.testing.assert_allclose(from_paths["f"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(from_pixels["f"], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="'pixels' or 'path'"):
        extractor({"id": np.array(["a"])})


def test_a_headed_checkpoint_and_transform_settings_reach_the_extractor(tmp_path):
    """Issue 23: the extractor (embed and evaluate) drops a checkpoint's classifier and uses the
    configured input size / crop_pct / interpolation and timm keywords."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    headed = timm.create_model(TINY_TIMM, pretrained=False, num_classes=5)
    weights = tmp_path / "headed.safetensors"
    save_file({k: v.contiguous() for k, v in headed.state_dict().items()}, str(weights))
    extractor = ImageFeatureExtractor(TINY_TIMM, "true", checkpoint=str(weights), input_size=32, crop_pct=1.0,
                                      interpolation="bicubic", model_kwargs={"drop_path_rate": 0.1})
    steps = [type(t).__name__ for t in extractor.eval_transform.transforms]
    resize = extractor.eval_transform.transforms[steps.index("Resize")]
    assert resize.size == 32 and resize.interpolation.value == "bicubic"  # resize to 32, crop nothing
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    with torch.no_grad():
        headed.eval().reset_classifier(0)
        expected = headed(extractor.eval_transform(image)[None]).numpy()
    got = extractor({"pixels": extractor.eval_transform(image)[None].numpy()})["image_feature"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
