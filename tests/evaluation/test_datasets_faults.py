"""pacl_ray.evaluation.datasets: the same fault gets the same outcome in every table reader.

1. a header without a column every row needs is one DatasetError naming the file, the column, the
   columns found and those expected (not one missing_field per row);
2. an empty cell is missing_field saying the field is empty;
3. a parsed value of the wrong type is wrong_type naming the field, the type found and expected;
   a cell that does not parse is bad_value (as in ingest).
"""

from __future__ import annotations

import os

import pytest
from PIL import Image

from pacl_ray.evaluation import datasets
from pacl_ray.evaluation.datasets import DatasetError


def _image(path) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path, "JPEG")


def webemo_csv(root, header="image,level1,level2,level3", extra: str = "") -> str:
    """WebEmo's CSV layout: 9 train and 3 test rows; ``extra`` appended to train.csv."""
    fine = [("positive", "joy", "cheerfulness"), ("negative", "anger", "rage"), ("negative", "fear", "horror")]
    for split, n in (("train", 9), ("test", 3)):
        lines = [header]
        for i in range(n):
            _image(root / "img" / f"{split}{i}.jpg")
            lines.append(f"img/{split}{i}.jpg,{','.join(fine[i % 3])}")
        if split == "train" and extra:
            lines.append(extra)
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return str(root)


def webemo_txt(root, hierarchy: str) -> str:
    rage = datasets.WEBEMO_FINE.index("rage")
    for split, n in (("train", 9), ("test", 2)):
        for i in range(n):
            _image(root / "images" / f"{split}{i}.jpg")
        (root / f"{split}25.txt").write_text("".join(f"https://x.org/{split}{i}.jpg {rage}\n" for i in range(n)))
    (root / "hierarchy.csv").write_text(hierarchy)
    return str(root)


EMOTIC_HEADER = "Folder,Filename,Categorical_Labels,Continuous_Labels"


def emotic(root, header=EMOTIC_HEADER, extra: str = "") -> str:
    for split in ("train", "val", "test"):
        lines = [header]
        for i in range(3):
            _image(root / "images" / f"{split}{i}.jpg")
            lines.append(f'images,{split}{i}.jpg,"[\'Happiness\']","[6, 4, 8]"')
        if split == "train" and extra:
            lines.append(extra)
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return str(root)


IAPS_HEADER = "IAPS\tvalmn\taromn\tdom1mn"


def iaps(root, header=IAPS_HEADER, extra: str = "") -> str:
    lines = [header]
    for i in range(10):
        _image(root / "images" / f"{1000 + i}.jpg")
        lines.append(f"{1000 + i}\t5\t5\t5")
    if extra:
        lines.append(extra)
    (root / "ratings.tsv").write_text("\n".join(lines) + "\n")
    return str(root)


# --------------------------------------------------------------------------- 1. header problems


HIERARCHY_OK = "level3,level2,level1\n" + "".join(f"{f},{s},{p}\n" for f, (s, p) in datasets.WEBEMO_HIERARCHY.items())


@pytest.mark.parametrize(
    "make, read, table, said, found",
    [
        (lambda r: webemo_csv(r, header="img,level1,level2,level3"), datasets.read_webemo, "train.csv",
         "no column 'image' or 'path'", "img, level1, level2, level3"),
        (lambda r: webemo_txt(r, "level3,parent,level1\nrage,anger,negative\n"), datasets.read_webemo, "hierarchy.csv",
         "no column 'level2'", "level3, parent, level1"),
        (lambda r: emotic(r, header="Folder,File,Categorical_Labels,Continuous_Labels"),
         lambda root: datasets.read_emotic(root, "multilabel"), "train.csv", "no column 'Filename'",
         "Folder, File, Categorical_Labels, Continuous_Labels"),
        (lambda r: emotic(r, header="Folder,Filename,Categorical_Labels,VAD"),
         lambda root: datasets.read_emotic(root, "vad"), "train.csv", "no column 'Continuous_Labels'",
         "Folder, Filename, Categorical_Labels, VAD"),
        (lambda r: iaps(r, header="IAPS\tvalence\taromn\tdom1mn"), datasets.read_iaps, "ratings.tsv",
         "no column 'valmn'", "IAPS, valence, aromn, dom1mn"),
    ],
    ids=["webemo-csv", "webemo-hierarchy", "emotic-multilabel", "emotic-vad", "iaps"],
)
def test_a_missing_column_is_one_error_for_the_table(tmp_path, make, read, table, said, found):
    root = make(tmp_path / "data")
    with pytest.raises(DatasetError) as info:
        read(root)
    message = str(info.value)
    assert message.startswith(f"{os.path.join(root, table)}: {said} (columns found: {found}; expected ")
    assert "\n" not in message and "rename the column" in message


def test_emotic_multilabel_does_not_need_the_vad_column(tmp_path):
    root = emotic(tmp_path / "data", header="Folder,Filename,Categorical_Labels")
    root_rows = os.path.join(root, "train.csv")
    with open(root_rows) as handle:  # drop the VAD cells so the rows match the header
        rows = [line.rsplit(',"[6', 1)[0] for line in handle.read().splitlines()]
    for split in ("train", "val", "test"):
        with open(os.path.join(root, f"{split}.csv"), "w") as handle:
            handle.write("\n".join(r.replace("train", split) for r in rows) + "\n")
    assert sum(len(s) for s in datasets.read_emotic(root, "multilabel").splits.values()) == 9


# --------------------------------------------------------------------------- 2. empty cells, 3. wrong types


@pytest.mark.parametrize(
    "make, read, reason, field, said",
    [
        (lambda r: webemo_csv(r, extra="img/train0.jpg,positive,,cheerfulness"), datasets.read_webemo,
         "missing_field", "level2", "field 'level2' is empty"),
        (lambda r: emotic(r, extra='images,,"[\'Fear\']","[1, 1, 1]"'), lambda root: datasets.read_emotic(root, "multilabel"),
         "missing_field", "Filename", "field 'Filename' is empty"),
        (lambda r: iaps(r, extra="2000\t\t5\t5"), datasets.read_iaps, "missing_field", "valmn", "field 'valmn' is empty"),
        (lambda r: emotic(r, extra='images,train0.jpg,"[1, 2]","[1, 1, 1]"'), lambda root: datasets.read_emotic(root, "multilabel"),
         "wrong_type", "Categorical_Labels", "holds int 1; expected a list of category names"),
        (lambda r: emotic(r, extra='images,train0.jpg,"{\'Fear\': 1}","[1, 1, 1]"'),
         lambda root: datasets.read_emotic(root, "multilabel"),
         "wrong_type", "Categorical_Labels", "is a dict"),
        (lambda r: emotic(r, extra='images,train0.jpg,"[\'Fear\']","[\'a\', \'b\', \'c\']"'),
         lambda root: datasets.read_emotic(root, "vad"), "wrong_type", "Continuous_Labels",
         "holds str 'a'; expected a list of numbers"),
        (lambda r: emotic(r, extra='images,train0.jpg,"[\'Fear\']","[True, 5, 5]"'),
         lambda root: datasets.read_emotic(root, "vad"), "wrong_type", "Continuous_Labels", "holds bool True"),
        (lambda r: emotic(r, extra='images,train0.jpg,"[\'Fear\']","[5, 5"'),
         lambda root: datasets.read_emotic(root, "vad"), "bad_value", "Continuous_Labels", "is not a list literal"),
        (lambda r: iaps(r, extra="2000\tn/a\t5\t5"), datasets.read_iaps, "bad_value", "ratings", "n/a"),
    ],
    ids=["webemo-empty", "emotic-empty", "iaps-empty", "emotic-numbers-as-names", "emotic-object",
         "emotic-names-as-numbers", "emotic-boolean", "emotic-unparsable", "iaps-unparsable"],
)
def test_a_bad_cell_costs_its_row_with_the_reason_ingest_gives(tmp_path, make, read, reason, field, said):
    root = make(tmp_path / "data")
    data = read(root)
    (bad,) = data.quarantine
    assert (bad["reason"], bad["field"]) == (reason, field) and said in bad["detail"], bad
    assert bad["source"].startswith(os.path.join(root, ""))


def test_webemo_txt_label_that_is_not_an_index_is_bad_value(tmp_path):
    root = webemo_txt(tmp_path / "data", HIERARCHY_OK)
    with open(os.path.join(root, "train25.txt"), "a") as handle:
        handle.write("https://x.org/train0.jpg anger\nhttps://x.org/train1.jpg\n")
    data = datasets.read_webemo(root)
    assert [(q["reason"], q["field"], q["source"].rsplit(":", 1)[1]) for q in data.quarantine] == [
        ("bad_value", "label", "10"), ("missing_field", "label", "11")]
