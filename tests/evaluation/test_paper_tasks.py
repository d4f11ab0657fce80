"""The downstream tasks of paper Table 2: FI-2 (FI folded to polarity) and WebEmo's 2/7/25 levels."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from pacl_ray.evaluation import datasets


def _image(path, color=(120, 30, 200)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), color=color).save(path, format="JPEG")


def test_fi2_folds_fi_into_the_papers_polarities(tmp_path):
    assert datasets.FI_POLARITY == {
        "amusement": "positive", "awe": "positive", "contentment": "positive", "excitement": "positive",
        "anger": "negative", "disgust": "negative", "fear": "negative", "sadness": "negative",
    }
    root = tmp_path / "FI"
    for cls in datasets.FI_CLASSES:
        for i in range(3):
            _image(str(root / cls / f"{cls}_{i}.jpg"))
    fi = datasets.read_fi(str(root))
    fi2 = datasets.load_dataset("single", "fi2", str(root))
    assert fi2.name == "fi2" and fi2.kind == "single" and fi2.label_names == [["negative", "positive"]]
    assert datasets.DISPLAY_NAMES["fi2"] == "FI-2"
    for split in datasets.SPLITS:
        a, b = fi.splits[split], fi2.splits[split]
        assert a.paths == b.paths  # same images, same split
        assert b.targets.dtype == np.int64
        for path, target in zip(b.paths, b.targets):
            emotion = os.path.basename(path).split("_")[0]
            assert fi2.label_names[0][target] == datasets.FI_POLARITY[emotion]
    assert fi2.fingerprints != fi.fingerprints  # the targets differ, so cached results do too


def test_fi2_is_a_task_spec():
    from pacl_ray.evaluation.evaluate import parse_task

    spec = parse_task("single:fi2=/data/FI")
    assert spec.dataset == "fi2" and spec.display == "FI-2"


def test_webemo_has_two_seven_and_twenty_five_classes_with_confusion_its_own():
    level2 = {second for second, _ in datasets.WEBEMO_HIERARCHY.values()}
    level1 = {first for _, first in datasets.WEBEMO_HIERARCHY.values()}
    assert len(datasets.WEBEMO_FINE) == 25 and len(level2) == 7 and level1 == {"positive", "negative"}
    assert datasets.WEBEMO_LEVEL2 == ["anger", "confusion", "fear", "joy", "love", "sadness", "surprise"]
    assert datasets.WEBEMO_HIERARCHY["confusion"] == ("confusion", "negative")
    # every second-level class has one polarity
    for second in level2:
        assert len({first for s, first in datasets.WEBEMO_HIERARCHY.values() if s == second}) == 1, second


def test_webemo_published_lists_read_with_seven_second_level_classes(tmp_path):
    root = tmp_path / "WebEmo"
    confusion = datasets.WEBEMO_FINE.index("confusion")
    surprise = datasets.WEBEMO_FINE.index("surprise")
    lines = []
    for i in range(9):
        _image(str(root / "images" / f"t{i}.jpg"))
        lines.append(f"https://example.com/t{i}.jpg {confusion if i % 2 else surprise}")
    _image(str(root / "images" / "s0.jpg"))
    (root / "train25.txt").write_text("\n".join(lines) + "\n")
    (root / "test25.txt").write_text(f"https://example.com/s0.jpg {confusion}\n")
    data = datasets.read_webemo(str(root))
    assert data.out_dims == [2, 7, 25] and data.label_names[1] == datasets.WEBEMO_LEVEL2
    assert data.splits["test"].targets[0].tolist() == [0, datasets.WEBEMO_LEVEL2.index("confusion"), confusion]
