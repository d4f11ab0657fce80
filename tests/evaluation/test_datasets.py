"""Each downstream reader on small generated folders in its documented layout, with bad entries."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from pacl_ray.evaluation import datasets
from pacl_ray.evaluation.datasets import DatasetError


def _image(path, color=(200, 30, 30), size=(8, 8), fmt=None) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)
    return str(path)


def _corrupt(path) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(b"this is not an image")
    return str(path)


def _empty(path) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()
    return str(path)


def _truncated(path) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return str(path)


def _reasons(data) -> dict[str, str]:
    """basename of the quarantined image (or source) -> reason"""
    return {os.path.basename(q["id"] or q["source"]): q["reason"] for q in data.quarantine}


# --------------------------------------------------------------------------- image checks


def test_check_image_reasons(tmp_path):
    assert datasets.check_image(_image(tmp_path / "ok.png")) is None
    assert datasets.check_image(str(tmp_path / "nope.jpg"))[0] == "missing_file"
    assert datasets.check_image(_empty(tmp_path / "empty.jpg"))[0] == "zero_size_image"
    assert datasets.check_image(_corrupt(tmp_path / "bad.jpg"))[0] == "corrupt_image"
    assert datasets.check_image(_truncated(tmp_path / "cut.jpg"))[0] == "truncated_image"
    reason, detail = datasets.check_image(_image(tmp_path / "big.png", size=(40, 40)), max_pixels=100)
    assert reason == "decompression_bomb" and "big.png" in detail


def test_split_indices_8_1_1_is_seeded_partition():
    parts = datasets.split_indices(20, seed=1)
    assert [len(p) for p in parts] == [16, 2, 2]
    assert sorted(np.concatenate(parts).tolist()) == list(range(20))
    assert all((a == b).all() for a, b in zip(parts, datasets.split_indices(20, seed=1)))
    assert not (parts[0] == datasets.split_indices(20, seed=2)[0]).all()


# --------------------------------------------------------------------------- ImageFolder


def test_imagefolder_presplit_with_bad_images(tmp_path):
    root = tmp_path / "emo"
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        for cls, color in (("happy", (250, 200, 0)), ("sad", (0, 0, 120))):
            for i in range(n):
                _image(root / split / cls / f"{i}.png", color)
    _corrupt(root / "train" / "sad" / "corrupt.jpg")
    _empty(root / "test" / "happy" / "empty.png")
    _truncated(root / "val" / "happy" / "cut.jpg")
    _image(root / "train" / "stray.png")  # not in a class folder

    data = datasets.read_imagefolder(str(root), name="emo")
    assert data.kind == "single" and data.label_names == [["happy", "sad"]]
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 6, "val": 2, "test": 4}
    assert _reasons(data) == {"corrupt.jpg": "corrupt_image", "empty.png": "zero_size_image",
                              "cut.jpg": "truncated_image", "stray.png": "missing_field"}
    train = data.splits["train"]
    assert train.targets.dtype == np.int64
    assert [("sad" in p) for p in train.paths] == [bool(t) for t in train.targets]
    assert set(data.fingerprints) == {"train", "val", "test"}


def test_imagefolder_single_folder_split_is_seeded(tmp_path):
    root = tmp_path / "flat"
    for cls in ("a", "b"):
        for i in range(10):
            _image(root / cls / f"{i}.png")
    data = datasets.read_imagefolder(str(root), seed=0)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 16, "val": 2, "test": 2}
    again = datasets.read_imagefolder(str(root), seed=0)
    assert again.splits["test"].paths == data.splits["test"].paths
    other = datasets.read_imagefolder(str(root), seed=5)
    assert other.splits["train"].paths != data.splits["train"].paths
    assert other.fingerprints["train"] != data.fingerprints["train"]
    limited = datasets.read_imagefolder(str(root), seed=0, limit=3)
    assert {k: len(v) for k, v in limited.splits.items()} == {"train": 3, "val": 2, "test": 2}


def test_imagefolder_carves_val_from_train_when_absent(tmp_path):
    root = tmp_path / "tt"
    for i in range(18):
        _image(root / "train" / ("a" if i % 2 else "b") / f"{i}.png")
    for i in range(2):
        _image(root / "test" / "a" / f"{i}.png")
    data = datasets.read_imagefolder(str(root))
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 16, "val": 2, "test": 2}


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError, match="not a directory"):
        datasets.read_imagefolder(str(tmp_path / "missing"))
    (tmp_path / "nothing" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        datasets.read_imagefolder(str(tmp_path / "nothing"))
    for i in range(3):
        _corrupt(tmp_path / "allbad" / "a" / f"{i}.jpg")
    with pytest.raises(DatasetError, match="no valid images"):
        datasets.read_imagefolder(str(tmp_path / "allbad"))


# --------------------------------------------------------------------------- FI, Emotion-6, UnbiasedEmo


def test_fi_release_layout_under_emotion_dataset(tmp_path):
    root = tmp_path / "FI"
    for cls in datasets.FI_CLASSES:
        for i in range(3):
            _image(root / "emotion_dataset" / cls.capitalize() / f"{cls}_{i}.jpg", fmt="JPEG")
    _corrupt(root / "emotion_dataset" / "Awe" / "awe_bad.jpg")
    data = datasets.read_fi(str(root))
    assert data.label_names == [datasets.FI_CLASSES]
    assert sum(len(s) for s in data.splits.values()) == 24
    assert _reasons(data) == {"awe_bad.jpg": "corrupt_image"}
    for split in data.splits.values():
        for path, target in zip(split.paths, split.targets):
            assert os.path.basename(path).startswith(datasets.FI_CLASSES[target])


def test_fi_rejects_unknown_class_folder(tmp_path):
    root = tmp_path / "FI"
    _image(root / "amusement" / "a.jpg")
    _image(root / "joy" / "b.jpg")
    with pytest.raises(DatasetError, match="unexpected class folder .*joy"):
        datasets.read_fi(str(root))


def test_emotion6_under_images(tmp_path):
    root = tmp_path / "Emotion6"
    for cls in datasets.EMOTION6_CLASSES:
        for i in range(2):
            _image(root / "images" / cls / f"{i}.jpg", fmt="JPEG")
    data = datasets.read_emotion6(str(root))
    assert data.label_names == [datasets.EMOTION6_CLASSES]
    assert sum(len(s) for s in data.splits.values()) == 12


def test_unbiasedemo_object_subfolders(tmp_path):
    root = tmp_path / "UnBiasedEmo"
    for cls in datasets.UNBIASEDEMO_CLASSES:
        for obj in ("dog", "child"):
            _image(root / "images" / cls / obj / "1.jpg", fmt="JPEG")
    _empty(root / "images" / "love" / "dog" / "2.jpg")
    data = datasets.read_unbiasedemo(str(root))
    assert data.label_names == [datasets.UNBIASEDEMO_CLASSES]
    assert sum(len(s) for s in data.splits.values()) == 12
    assert _reasons(data) == {"2.jpg": "zero_size_image"}
    love = datasets.UNBIASEDEMO_CLASSES.index("love")
    paths = [p for s in data.splits.values() for p, t in zip(s.paths, s.targets) if t == love]
    assert len(paths) == 2 and all("/love/" in p for p in paths)


# --------------------------------------------------------------------------- WebEmo


def test_webemo_csv_three_levels(tmp_path):
    root = tmp_path / "WebEmo"
    rows = {"train": [], "test": []}
    fine = [("positive", "joy", "cheerfulness"), ("negative", "anger", "rage"), ("negative", "fear", "horror")]
    for split, n in (("train", 9), ("test", 3)):
        for i in range(n):
            l1, l2, l3 = fine[i % 3]
            rel = f"img/{split}_{i}.jpg"
            _image(root / rel, fmt="JPEG")
            rows[split].append(f"{rel},{l1},{l2},{l3}")
    rows["train"].append("img/nolabel.jpg,positive,,zest")  # missing level2
    rows["test"].append("img/missing.jpg,negative,fear,horror")  # image absent
    for split, lines in rows.items():
        (root / f"{split}.csv").write_text("image,level1,level2,level3\n" + "\n".join(lines) + "\n")
    data = datasets.read_webemo(str(root))
    assert data.kind == "hierarchical"
    assert data.label_names == [["negative", "positive"], ["anger", "fear", "joy"], ["cheerfulness", "horror", "rage"]]
    assert data.out_dims == [2, 3, 3]
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 8, "val": 1, "test": 3}
    reasons = {q["field"]: q["reason"] for q in data.quarantine}
    assert reasons == {"level2": "missing_field", "image": "missing_file"}
    test = data.splits["test"]
    assert test.targets.shape == (3, 3)
    first = test.paths.index(str(root / "img/test_1.jpg"))
    assert test.targets[first].tolist() == [0, 0, 2]  # negative, anger, rage


def test_webemo_published_txt_lists(tmp_path):
    root = tmp_path / "WebEmo"
    rage = datasets.WEBEMO_FINE.index("rage")
    zest = datasets.WEBEMO_FINE.index("zest")
    train_lines, test_lines = [], []
    for i in range(9):
        _image(root / "images" / f"t{i}.jpg", fmt="JPEG")
        train_lines.append(f"https://example.com/photos/t{i}.jpg {rage if i % 2 else zest}")
    train_lines.append("https://example.com/photos/x.jpg 99")  # label out of range
    train_lines.append("onlyaurl")  # no label
    _image(root / "images" / "s0.jpg", fmt="JPEG")
    test_lines.append(f"https://example.com/s0.jpg {rage}")
    (root / "train25.txt").write_text("\n".join(train_lines) + "\n")
    (root / "test25.txt").write_text("\n".join(test_lines) + "\n")
    data = datasets.read_webemo(str(root))
    assert data.label_names[2] == datasets.WEBEMO_FINE
    assert data.label_names[0] == ["negative", "positive"]
    level2 = data.label_names[1]
    assert data.splits["test"].targets[0].tolist() == [0, level2.index("anger"), rage]
    assert sorted(q["reason"] for q in data.quarantine) == ["bad_value", "missing_field"]
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 8, "val": 1, "test": 1}


def test_webemo_missing_annotations(tmp_path):
    (tmp_path / "w").mkdir()
    with pytest.raises(DatasetError, match="train.csv .*train25.txt"):
        datasets.read_webemo(str(tmp_path / "w"))


# --------------------------------------------------------------------------- Emotic


def _emotic(tmp_path):
    root = tmp_path / "Emotic"
    header = "Index,Folder,Filename,Image Size,BBox,Categorical_Labels,Continuous_Labels,Gender,Age\n"
    tables = {"train": [], "val": [], "test": []}
    for split in tables:
        for i in range(3):
            _image(root / "mscoco" / "images" / f"{split}{i}.jpg", fmt="JPEG")
            tables[split].append(
                f'{i},mscoco/images,{split}{i}.jpg,"[8, 8]","[0, 0, 4, 4]","[\'Happiness\', \'Peace\']","[6, 4, 8]",Male,Adult'
            )
    # a second person in train0: categories are merged, VAD averaged
    tables["train"].append('9,mscoco/images,train0.jpg,"[8, 8]","[1, 1, 3, 3]","[\'Doubt/Confusion\']","[2, 6, 4]",Female,Kid')
    tables["train"].append('10,mscoco/images,train1.jpg,"[8, 8]","[1, 1, 3, 3]","[\'Boredom\']","[2, 2]",Female,Kid')
    tables["test"].append('11,mscoco/images,absent.jpg,"[8, 8]","[1, 1, 3, 3]","[\'Fear\']","[1, 1, 1]",Male,Adult')
    (root / "annotations").mkdir(parents=True)
    for split, lines in tables.items():
        (root / "annotations" / f"{split}.csv").write_text(header + "\n".join(lines) + "\n")
    return root


def test_emotic_multilabel_whole_image(tmp_path):
    root = _emotic(tmp_path)
    data = datasets.read_emotic(str(root), "multilabel")
    assert data.label_names == [datasets.EMOTIC_CATEGORIES]
    train = data.splits["train"]
    assert train.targets.shape == (3, 26) and train.targets.dtype == np.float32
    first = train.paths.index(str(root / "mscoco/images/train0.jpg"))
    on = {datasets.EMOTIC_CATEGORIES[i] for i in np.flatnonzero(train.targets[first])}
    assert on == {"Happiness", "Peace", "Doubt/Confusion"}
    reasons = sorted(q["reason"] for q in data.quarantine)
    assert reasons == ["bad_value", "missing_file"]  # unknown category 'Boredom'; absent.jpg


def test_emotic_vad_mean_over_persons_scaled(tmp_path):
    root = _emotic(tmp_path)
    data = datasets.read_emotic(str(root), "vad")
    train = data.splits["train"]
    first = train.paths.index(str(root / "mscoco/images/train0.jpg"))
    np.testing.assert_allclose(train.targets[first], [0.4, 0.5, 0.6], rtol=1e-6)  # mean([6,4,8],[2,6,4]) / 10
    # train1's second row has only 2 VAD values -> bad_value; its first row still counts
    assert any(q["reason"] == "bad_value" and "Continuous_Labels" in q["detail"] for q in data.quarantine)
    assert len(train) == 3


# --------------------------------------------------------------------------- IAPS


def test_iaps_ratings_table(tmp_path):
    root = tmp_path / "IAPS"
    lines = ["desc\tIAPS\tvalmn\tvalsd\taromn\tarosd\tdom1mn\tdom1sd\tdom2mn\tdom2sd\tset"]
    for i in range(10):
        number = f"{1000 + i}" if i != 3 else "1003.1"
        _image(root / "images" / f"{number}.jpg", fmt="JPEG")
        lines.append(f"Snake {i}\t{number}\t{1 + i * 0.5}\t1.0\t4.5\t2.0\t{9 - i * 0.5}\t1.0\t5\t1\t1")
    lines.append("Dup\t1000\t5\t1\t5\t1\t5\t1\t5\t1\t1")
    lines.append("Gone\t2000\t5\t1\t5\t1\t5\t1\t5\t1\t1")
    lines.append("Bad\t2001\tn/a\t1\t5\t1\t5\t1\t5\t1\t1")
    (root / "AllSubjects_1-20.txt").write_text("\n".join(lines) + "\n")
    data = datasets.read_iaps(str(root))
    assert data.kind == "vad" and data.label_names == [datasets.VAD_NAMES]
    assert sum(len(s) for s in data.splits.values()) == 10
    everything = {p: t for s in data.splits.values() for p, t in zip(s.paths, s.targets)}
    np.testing.assert_allclose(everything[str(root / "images/1003.1.jpg")], np.array([2.5, 4.5, 7.5]) / 9, rtol=1e-6)
    assert sorted(q["reason"] for q in data.quarantine) == ["bad_value", "duplicate_id", "missing_file"]


def test_iaps_missing_table(tmp_path):
    (tmp_path / "i").mkdir()
    with pytest.raises(DatasetError, match="no ratings table"):
        datasets.read_iaps(str(tmp_path / "i"))


def test_load_dataset_registry(tmp_path):
    with pytest.raises(DatasetError, match="no reader for single:webemo"):
        datasets.load_dataset("single", "webemo", str(tmp_path))


# --------------------------------------------------------------------------- real-world faults


def test_imagefolder_unzipped_on_macos(tmp_path):
    """``__MACOSX/`` with ``._*`` resource forks beside the class folders, ``.DS_Store`` files:
    ignored, so there are exactly the two real classes and nothing is quarantined."""
    root = tmp_path / "emo"
    for cls in ("happy", "sad"):
        for i in range(5):
            _image(root / cls / f"{i}.jpg", fmt="JPEG")
        (root / cls / f"._{0}.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (root / "__MACOSX" / cls).mkdir(parents=True, exist_ok=True)
        (root / "__MACOSX" / cls / "._0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "._stray.jpg").write_bytes(b"AppleDouble")
    data = datasets.read_imagefolder(str(root))
    assert data.label_names == [["happy", "sad"]]
    assert sum(len(s) for s in data.splits.values()) == 10 and data.quarantine == []


def test_class_folder_without_a_valid_image_is_named(tmp_path):
    root = tmp_path / "emo"
    for i in range(4):
        _image(root / "happy" / f"{i}.png")
        _corrupt(root / "sad" / f"{i}.jpg")
    with pytest.raises(DatasetError, match=r"class 'sad' has no valid image \(folder .*/sad"):
        datasets.read_imagefolder(str(root))
    empty = tmp_path / "empty"
    for i in range(4):
        _image(empty / "happy" / f"{i}.png")
    (empty / "sad").mkdir()
    (empty / "sad" / "._0.jpg").write_bytes(b"AppleDouble")  # hidden: still no image
    with pytest.raises(DatasetError, match=r"class folder '.*/empty/sad' has no images"):
        datasets.read_imagefolder(str(empty))


def test_emotic_empty_label_list_is_an_empty_cell(tmp_path):
    root = _emotic(tmp_path)
    path = root / "annotations" / "val.csv"
    with open(path, "a") as handle:
        handle.write('12,mscoco/images,val0.jpg,"[8, 8]","[1, 1, 3, 3]",[],"[5, 5, 5]",Male,Adult\n')
    data = datasets.read_emotic(str(root), "multilabel")
    empty = [q for q in data.quarantine if q["source"].endswith("val.csv:5")]
    assert [(q["reason"], q["field"]) for q in empty] == [("missing_field", "Categorical_Labels")]
    val = data.splits["val"]
    first = val.paths.index(str(root / "mscoco/images/val0.jpg"))
    on = {datasets.EMOTIC_CATEGORIES[i] for i in np.flatnonzero(val.targets[first])}
    assert on == {"Happiness", "Peace"}  # the person with [] adds nothing, the image keeps its labels


def test_annotation_table_faults_cost_only_their_row(tmp_path):
    """Quoted newline in a cell, a cell that is not UTF-8, a row with a missing field: each row
    on its own; the others are read."""
    root = tmp_path / "WebEmo"
    for i in range(12):
        _image(root / "img" / f"{i}.jpg", fmt="JPEG")
    train = [b"image,level1,level2,level3,note"]
    for i in range(9):
        train.append(f'img/{i}.jpg,positive,joy,cheerfulness,"line one\nline two, with comma"'.encode())
    train.append(b"img/9.jpg,positive,j\xf6y,cheerfulness,x")  # not UTF-8, in a used field
    train.append(b"img/10.jpg,positive,joy")  # too few fields
    train.append(b"img/11.jpg,positive,joy,cheerfulness,caf\xe9")  # not UTF-8 in an unused field: kept
    (root / "train.csv").write_bytes(b"\n".join(train) + b"\n")
    (root / "test.csv").write_bytes(b"image,level1,level2,level3,note\nimg/0.jpg,negative,anger,rage,x\n")
    data = datasets.read_webemo(str(root))
    reasons = sorted((q["reason"], q["source"].rsplit(":", 1)[1]) for q in data.quarantine)
    assert reasons == [("malformed_record", "21"), ("undecodable_text", "20")]  # lines (9 two-line rows first)
    assert len(data.splits["train"]) + len(data.splits["val"]) == 10


def test_webemo_txt_list_with_an_undecodable_line(tmp_path):
    root = tmp_path / "WebEmo"
    rage = datasets.WEBEMO_FINE.index("rage")
    lines = []
    for i in range(9):
        _image(root / "images" / f"t{i}.jpg", fmt="JPEG")
        lines.append(f"https://example.com/t{i}.jpg {rage}".encode())
    lines.insert(3, b"https://example.com/caf\xe9.jpg 3")
    _image(root / "images" / "s0.jpg", fmt="JPEG")
    (root / "train25.txt").write_bytes(b"\n".join(lines) + b"\n")
    (root / "test25.txt").write_text(f"https://example.com/s0.jpg {rage}\n")
    data = datasets.read_webemo(str(root))
    assert [(q["reason"], q["source"].rsplit(":", 1)[1]) for q in data.quarantine] == [("undecodable_text", "4")]
    assert len(data.splits["train"]) + len(data.splits["val"]) == 9


def test_downstream_images_decode_upright_and_scaled(tmp_path):
    """Dataset validation and evaluation's load_rgb use the shared decoder."""
    from pacl_ray.formats.images import load_rgb

    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20], array[:, 20:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(array).save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=100, subsampling=0)
    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(1, 256).repeat(2, 0)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert datasets.check_image(str(tmp_path / "phone.jpg")) is None
    phone = load_rgb(str(tmp_path / "phone.jpg"))
    assert phone.size == (20, 40) and np.abs(np.asarray(phone, np.int16)[5, 10] - (255, 0, 0)).max() < 10
    deep = np.asarray(load_rgb(str(tmp_path / "deep.png")))
    assert deep.shape == (2, 256, 3) and deep[0, :, 0].tolist() == list(range(256))
