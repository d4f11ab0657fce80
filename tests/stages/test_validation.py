"""The training stage's held-out validation probe (issue 20), without Ray: the probe set, when it
runs, the features it reads (eval mode) and the accuracy it reports. The probe inside a training
run is tested in tests/stages/test_train.py; reading it from a task in
tests/evaluation/test_validation_set.py."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from pacl_ray.core import metrics
from pacl_ray.core.backbones import create_backbone
from pacl_ray.stages.validation import (
    VAL_METRIC, ValidationSet, Validator, backbone_features, latest_val, probe_accuracy,
)


def colour_images(n_per_class: int, seed: int = 0) -> tuple[tuple, np.ndarray]:
    """Encoded 20 px PNGs of two colours (two classes) with noise; labels int64 [2n]."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, colour in enumerate(((240, 200, 30), (30, 40, 120))):
        for _ in range(n_per_class):
            pixels = np.clip(np.array(colour) + rng.integers(-30, 30, (20, 20, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            images.append(buf.getvalue())
            labels.append(label)
    return tuple(images), np.asarray(labels, dtype=np.int64)


def probe_set(n_per_class=6, k=3, every=1) -> ValidationSet:
    images, labels = colour_images(n_per_class)
    query = np.zeros(len(images), bool)
    query[n_per_class - 2:n_per_class] = query[-2:] = True  # two queries per class
    return ValidationSet("colours", images, labels, query, k=k, every_epochs=every, batch_size=5)


def test_probe_set_checks_its_parts():
    data = probe_set()
    with pytest.raises(ValueError, match="12 images, 11 targets"):
        ValidationSet("x", data.images, data.targets[:-1], data.query)
    with pytest.raises(ValueError, match="needs both bank and query images"):
        ValidationSet("x", data.images, data.targets, np.ones(12, bool))


@pytest.mark.parametrize("every, steps, expected", [
    (1, [1, 3, 4], [True, True, True]),
    (2, [1, 3, 4, 2, 5], [False, True, False, True, True]),  # and always the last epoch
    (3, [2, 2, 2, 2, 2, 0, 0], [False, False, True, False, True]),  # the last epoch that takes a step
])
def test_probe_runs_every_n_epochs_and_at_the_last_trained_one(every, steps, expected):
    data = probe_set(every=every)
    trained = [e for e, n in enumerate(steps) if n]  # the loop asks at the end of epochs that took steps
    assert [data.due(e, steps) for e in trained] == expected


def test_latest_val_is_nan_until_a_probe_ran():
    assert math.isnan(latest_val([]))
    assert math.isnan(latest_val([{"total": 1.0}]))
    rows = [{"total": 1.0, VAL_METRIC: 25.0}, {"total": 0.9}, {"total": 0.8, VAL_METRIC: 50.0}, {"total": 0.7}]
    assert latest_val(rows) == 50.0


def test_validator_reports_the_knn_vote_on_eval_mode_features():
    torch.manual_seed(0)
    backbone = create_backbone("test_resnet", "false", input_size=32)  # BatchNorm: eval mode matters
    model = backbone.model.train()
    data = probe_set()
    validator = Validator(data, backbone.eval_transform, torch.device("cpu"))
    got = validator.accuracy(model)
    assert model.training  # its mode is restored
    # brute-force reference: the same images through the eval transform, in eval mode, by hand
    reference = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    reference.load_state_dict(model.state_dict())
    reference.eval()
    with torch.no_grad():
        batch = torch.stack([backbone.eval_transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in data.images])
        features = reference(batch).numpy()
    q = data.query
    expected = 100 * metrics.knn_accuracy(features[~q], data.targets[~q], features[q], data.targets[q], 3)
    assert got == pytest.approx(expected)
    np.testing.assert_allclose(backbone_features(model, data.images, backbone.eval_transform, torch.device("cpu"), 5),
                               features, rtol=1e-5, atol=1e-5)
    assert probe_accuracy(data, features) == pytest.approx(expected)
    # in train mode BatchNorm would use batch statistics: different features
    with torch.no_grad():
        assert not np.allclose(model.train()(batch).numpy(), features, atol=1e-4)
