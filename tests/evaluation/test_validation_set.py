"""The training stage's validation probe set, read from a labelled task (issue 20)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pacl_ray import config as config_mod
from pacl_ray.evaluation.validation_set import load_validation_set, validation_task
from toy_world import toy_images


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return toy_images(str(tmp_path_factory.mktemp("toy")))


def _cfg(**sections) -> config_mod.RunConfig:
    return config_mod.from_dict(sections)


def _bytes_of(root, split):
    found = []
    for dirpath, _, names in os.walk(os.path.join(root, split)):
        found += [open(os.path.join(dirpath, n), "rb").read() for n in sorted(names) if n.endswith(".png")]
    return found


def test_off_by_default_and_the_task_falls_back_to_evaluate_tasks(toy_root):
    assert load_validation_set(_cfg()) is None
    cfg = _cfg(evaluate={"tasks": [f"imagefolder:toy={toy_root}", "vad:iaps=/x"]})
    assert validation_task(cfg) == f"imagefolder:toy={toy_root}"
    assert validation_task(_cfg(validation={"task": "single:fi=/y"}, evaluate={"tasks": ["x"]})) == "single:fi=/y"


def test_bank_is_the_train_split_and_queries_the_val_split(toy_root):
    cfg = _cfg(validation={"every_epochs": 2, "k": 4, "batch_size": 7}, evaluate={"tasks": [f"imagefolder:toy={toy_root}"]})
    data = load_validation_set(cfg)
    # 8 valid train images per class (the broken one is quarantined), 3 val images per class
    assert (len(data.images), int((~data.query).sum()), int(data.query.sum())) == (22, 16, 6)
    assert sorted(data.images[i] for i in np.flatnonzero(~data.query)) == sorted(_bytes_of(toy_root, "train"))
    assert sorted(data.images[i] for i in np.flatnonzero(data.query)) == sorted(_bytes_of(toy_root, "val"))
    assert not set(_bytes_of(toy_root, "test")) & set(data.images)  # the test split is never read
    assert data.targets.dtype == np.int64 and sorted(set(data.targets.tolist())) == [0, 1]
    assert (data.k, data.every_epochs, data.batch_size, data.name) == (4, 2, 7, "toy")
    # capped per split by a seeded choice: the same images on every call (every trial)
    capped = _cfg(validation={"every_epochs": 1, "max_images": 2, "task": f"imagefolder:toy={toy_root}"})
    first, again = load_validation_set(capped), load_validation_set(capped)
    assert (int((~first.query).sum()), int(first.query.sum())) == (2, 2) and first.images == again.images


@pytest.mark.parametrize("sections, message", [
    ({"validation": {"every_epochs": 1}}, r"validation.every_epochs=1 needs a labelled task: set validation.task="),
    ({"validation": {"every_epochs": 1, "task": "vad:iaps=/nowhere"}},
     r"validation.task='vad:iaps=/nowhere': a vad task has no class labels"),
    ({"validation": {"every_epochs": 1, "task": "fi=/x"}}, r"validation.task='fi=/x': task 'fi=/x': expected KIND"),
    ({"validation": {"every_epochs": 1}, "evaluate": {"tasks": ["imagefolder:gone=/no/such/dir"]}},
     r"evaluate.tasks\[0\] \(validation.task is empty\)='imagefolder:gone=/no/such/dir': .*not a directory"),
])
def test_errors_name_the_keys(sections, message):
    with pytest.raises(config_mod.ConfigError, match=message):
        load_validation_set(_cfg(**sections))
