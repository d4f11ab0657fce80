"""The downstream tasks of paper Table 2: FI-2 (FI folded to polarity) and WebEmo's 2/7/25 levels."""

from __future__ import annotations

import os

import numpy as np
import pytest
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


# --------------------------------------------------------------------------- WebEmo per level (Table 2)

# fine emotion -> colour: the polarity is the colour family, so a frozen probe can read level 1
_WEBEMO_COLOURS = {"rage": (230, 40, 40), "horror": (200, 20, 60), "confusion": (180, 60, 20),
                   "zest": (30, 200, 230), "affection": (40, 160, 250), "surprise": (20, 230, 180)}


def webemo_folder(root, n_train=12, n_test=6):
    """A tiny WebEmo in the published list layout: ``train25.txt`` / ``test25.txt`` of
    ``<url> <fine index>`` lines and ``images/<basename>``; six fine emotions over both polarities."""
    rng = np.random.default_rng(0)
    names = list(_WEBEMO_COLOURS)
    for split, n in (("train", n_train), ("test", n_test)):
        lines = []
        for i in range(n):
            fine = names[i % len(names)]
            pixels = np.clip(np.array(_WEBEMO_COLOURS[fine]) + rng.integers(-20, 20, (16, 16, 3)), 0, 255)
            os.makedirs(os.path.join(root, "images"), exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(root, "images", f"{split}{i}.png"))
            lines.append(f"https://example.com/p/{split}{i}.png {datasets.WEBEMO_FINE.index(fine)}")
        with open(os.path.join(root, f"{split}25.txt"), "w") as handle:
            handle.write("\n".join(lines) + "\n")
    return root


def test_webemo_levels_are_single_label_tasks_on_the_same_images(tmp_path):
    hierarchical = datasets.read_webemo(webemo_folder(str(tmp_path / "WebEmo")))
    levels = datasets.webemo_levels(hierarchical)
    assert list(levels) == ["webemo2", "webemo7", "webemo25"]
    for level, (name, data) in enumerate(levels.items()):
        assert data.kind == "single" and data.name == name
        assert data.label_names == [hierarchical.label_names[level]]
        assert data.out_dims == [[2, 7, 25][level]]
        for split in datasets.SPLITS:
            assert data.splits[split].paths == hierarchical.splits[split].paths
            assert data.splits[split].targets.dtype == np.int64 and data.splits[split].targets.ndim == 1
            assert data.splits[split].targets.tolist() == hierarchical.splits[split].targets[:, level].tolist()
        # shared content fingerprint: the three levels reuse one frozen-feature extraction
        assert data.fingerprints == hierarchical.fingerprints
    test = levels["webemo7"].splits["test"]
    for path, target in zip(test.paths, test.targets):
        fine = list(_WEBEMO_COLOURS)[int(os.path.basename(path)[4:-4]) % 6]
        assert levels["webemo7"].label_names[0][target] == datasets.WEBEMO_HIERARCHY[fine][0]
    one = datasets.load_dataset("single", "webemo25", str(tmp_path / "WebEmo"))
    assert one.splits["test"].targets.tolist() == levels["webemo25"].splits["test"].targets.tolist()
    assert datasets.DISPLAY_NAMES["webemo7"] == "WebEmo-7"
    with pytest.raises(datasets.DatasetError, match="per-level tasks need hierarchical"):
        datasets.webemo_levels(levels["webemo2"])


def test_levels_webemo_expands_to_the_three_levels_read_once(tmp_path, monkeypatch):
    from pacl_ray.evaluation import tasks

    spec = tasks.parse_task("levels:webemo=/data/WebEmo,limit=5,name=W", default_seed=4)
    expanded = tasks.expand_tasks([tasks.parse_task("single:fi=/f"), spec])
    assert [s.text for s in expanded] == ["single:fi=/f", "single:webemo2=/data/WebEmo,limit=5,name=W",
                                          "single:webemo7=/data/WebEmo,limit=5,name=W",
                                          "single:webemo25=/data/WebEmo,limit=5,name=W"]
    assert [(s.kind, s.root, s.seed, s.limit, s.display) for s in expanded[1:]] == [
        ("single", "/data/WebEmo", 4, 5, f"W-{n}") for n in (2, 7, 25)]
    assert [s.display for s in tasks.expand_tasks([tasks.parse_task("levels:webemo=/w")])] == [
        "WebEmo-2", "WebEmo-7", "WebEmo-25"]
    with pytest.raises(tasks.TaskSpecError, match="levels datasets: webemo"):
        tasks.parse_task("levels:fi=/f")
    with pytest.raises(tasks.TaskSpecError, match="expand_tasks"):
        tasks.load_task(spec)

    root = webemo_folder(str(tmp_path / "WebEmo"))
    reads = []
    real = tasks.read_webemo
    monkeypatch.setattr(tasks, "read_webemo", lambda *a, **k: reads.append(a) or real(*a, **k))
    loaded = tasks.load_tasks([tasks.parse_task(f"levels:webemo={root}"), tasks.parse_task(f"single:webemo7={root}")])
    assert [(s.dataset, d.out_dims) for s, d in loaded] == [
        ("webemo2", [2]), ("webemo7", [7]), ("webemo25", [25]), ("webemo7", [7])]
    assert len(reads) == 1  # one read and image validation for all four


def test_evaluate_levels_webemo_gives_every_level_in_one_evaluation(ray_local, tmp_path):
    from conftest import TINY_TIMM
    from pacl_ray import config as config_mod
    from pacl_ray.evaluation import evaluate, report

    root = webemo_folder(str(tmp_path / "WebEmo"))
    cfg = config_mod.from_dict({"output_dir": str(tmp_path / "runs"),
                                "model": {"backbone": TINY_TIMM, "backbone_pretrained": "false"},
                                "evaluate": {"linear_epochs": 3, "batch_size": 16}})
    out_dir = str(tmp_path / "runs" / "table")
    rows = evaluate.evaluate_backbone(cfg, TINY_TIMM, "", [f"levels:webemo={root}", f"hierarchical:webemo={root}"],
                                      out_dir, label="r", protocol="linear")
    assert [r["dataset"] for r in rows] == ["WebEmo-2", "WebEmo-7", "WebEmo-25", "WebEmo"]
    assert [report.metric_columns(r) for r in rows] == [
        ["Acc-2", "F1-2"], ["Acc-7", "F1-7"], ["Acc-25", "F1-25"],
        ["Acc-2", "F1-2", "Acc-7", "F1-7", "Acc-25", "F1-25"]]
    assert all(0 <= r[c] <= 100 for r in rows for c in report.metric_columns(r))
    assert all(r["n_test"] == 6 for r in rows)
    with open(os.path.join(out_dir, "table2.md")) as handle:
        table2 = handle.read()
    cells = [f"{rows[i][c]:.2f}" for i, c in ((0, "Acc-2"), (1, "Acc-7"), (2, "Acc-25"))]
    assert table2.splitlines()[2] == f"| Linear Evaluation | r | - | - | {' | '.join(cells)} |"
