"""pacl_ray.formats.manifests: each kind of input fault gets the same treatment in every reader.

1. a whole-file problem (a CSV/TSV header or Parquet schema without a required column, a Parquet
   column of the wrong type) is one ManifestSchemaError naming the file, the problem, the columns
   found and expected, raised before any row; readers without a header (JSONL, JSON list, TumEmo,
   WebDataset) quarantine the record as missing_field, naming the keys (members) it does have;
2. an absent field is missing_field (empty texts are kept for validation: empty_text, see
   tests/stages/test_ingest_faults.py);
3. a value of the wrong type is wrong_type, naming the field, the type found and the type expected.
No Ray here.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pacl_ray.formats import manifests, tables
from pacl_ray.formats.manifests import ManifestSchemaError
from tarfiles import tar_file

PNG = b"\x89PNG fake bytes"  # readers never decode images


def records(path, kind, images=None) -> list[dict]:
    return list(manifests.iter_records(str(path), kind, 0, images))


def verdict(rows: list[dict]) -> tuple:
    """(row or key, reason, field, detail) of the one bad record."""
    (bad,) = [r for r in rows if r["reason"]]
    return bad["source"].rsplit(":", 1)[-1].rsplit("#", 1)[-1], bad["reason"], bad["field"], bad["detail"]


# --------------------------------------------------------------------------- 1. whole-file problems


def _csv_caption(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,image,caption\n1,a.png,hello\n2,b.png,world\n")
    return path, "csv"


def _tsv_caption(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text("id\timage\tcaption\n1\ta.png\thello\n")
    return path, "tsv"


def _parquet_caption(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["1", "2"], "image": ["a.png", "b.png"], "caption": ["hello", "world"]}), path)
    return path, "parquet"


@pytest.mark.parametrize("make", [_csv_caption, _tsv_caption, _parquet_caption], ids=["csv", "tsv", "parquet"])
def test_a_missing_column_is_one_error_for_the_file(tmp_path, make):
    path, kind = make(tmp_path)
    for read in (lambda: manifests.check_header(str(path), kind), lambda: records(path, kind)):
        with pytest.raises(ManifestSchemaError) as info:
            read()
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{path}: no column 'text'")
        assert "columns found: id, image, caption" in message
        assert "expected image, text" in message and "'caption' -> 'text'" in message
        assert "no config key maps column names" in message


def test_a_header_without_rows_is_still_checked(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("picture,text\n")
    with pytest.raises(ManifestSchemaError, match=r"no column 'image' \(columns found: picture, text;.*'picture' -> 'image'"):
        manifests.check_header(str(path), "csv")


@pytest.mark.parametrize(
    "name, header, said",
    [
        ("m.csv", "id;image;text", "the header looks semicolon-separated; a .csv must be comma-separated (or save it as .tsv for tabs)"),
        ("m.csv", "id|image|text", "the header looks pipe-separated; a .csv must be comma-separated"),
        ("m.csv", "id\timage\ttext", "the header looks tab-separated; a .csv must be comma-separated (save it as .tsv)"),
        ("m.csv", "id;img;text", "the header looks semicolon-separated"),  # one cell: the delimiter, whatever the names
        ("m.tsv", "id,image,text", "the header looks comma-separated; a .tsv must be tab-separated (or save it as .csv for commas)"),
    ],
)
def test_a_header_with_another_delimiter_says_so(tmp_path, name, header, said):
    path = tmp_path / name
    path.write_text(f"{header}\n1;a.png;hello\n")
    kind = "tsv" if name.endswith(".tsv") else "csv"
    for read in (lambda: manifests.check_header(str(path), kind), lambda: records(path, kind)):
        with pytest.raises(ManifestSchemaError) as info:
            read()
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{path}: {said}")
        assert "no column" not in message


def test_other_delimiters_inside_a_comma_header_are_not_mistaken(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,image,text;notes\n1,a.png,hello\n")  # a column named "text;notes": really no 'text'
    with pytest.raises(ManifestSchemaError, match=r"no column 'text'"):
        manifests.check_header(str(path), "csv")
    (tmp_path / "ok.csv").write_text("id,image,text,a;b\n1,a.png,x;y,z\n")
    manifests.check_header(str(tmp_path / "ok.csv"), "csv")


def test_a_good_header_passes_and_headerless_kinds_are_not_checked(tmp_path):
    good = tmp_path / "m.csv"
    good.write_text("image,text,extra\na.png,t,x\n")
    manifests.check_header(str(good), "csv")
    (tmp_path / "m.jsonl").write_text('{"caption": "no header to check"}\n')
    manifests.check_header(str(tmp_path / "m.jsonl"), "jsonl")


@pytest.mark.parametrize(
    "column, values, said",
    [
        ("text", pa.array([123, 456], pa.int64()), "column 'text' is integer, expected string"),
        ("image", pa.array([1, 2], pa.int32()), "column 'image' is integer, expected string path"),
        ("id", pa.array([True, False]), "column 'id' is boolean, expected string or integer"),
        ("anps", pa.array([[1], [2]], pa.list_(pa.int64())), "column 'anps' is list of int64"),
        ("factual_score", pa.array([[0.1], [0.2]]), "column 'factual_score' is list of double, expected number"),
        ("label", pa.array([True, True]), "column 'label' is boolean, expected string or number"),
    ],
)
def test_a_parquet_column_of_the_wrong_type_is_one_error_for_the_file(tmp_path, column, values, said):
    data = {"image": pa.array(["a.png", "b.png"]), "text": pa.array(["x", "y"]), column: values}
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table(data), path)
    with pytest.raises(ManifestSchemaError) as info:
        records(path, "parquet")
    assert str(info.value).startswith(f"{path}: {said}")
    with pytest.raises(ManifestSchemaError):
        manifests.check_header(str(path), "parquet")


def test_accepted_parquet_column_types(tmp_path):
    """Binary text (undecoded), dictionary (pandas categorical) text, integer and float ids,
    list<string> anps, string scores (parsed per row), an all-null optional column."""
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({
        "id": pa.array([1.0, 2.0]), "image": pa.array([PNG, PNG], pa.binary()),
        "text": pa.array(["a", "b"]).dictionary_encode(), "anps": pa.array([["x"], []], pa.list_(pa.string())),
        "factual_score": pa.array(["0.5", "0.25"]), "label": pa.array([None, None], pa.null()),
    }), path)
    rows = records(path, "parquet")
    assert [(r["id"], r["text"], r["factual_score"], r["reason"]) for r in rows] == [
        ("1", "a", 0.5, None), ("2", "b", 0.25, None)]


# --------------------------------------------------------------------------- 1b/2. per-record missing fields


def _jsonl_no_text(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "ok", "image": "a.png", "text": "t"}) + "\n"
                    + json.dumps({"id": "x", "image": "a.png", "caption": "t"}) + "\n")
    return records(path, "jsonl"), ("2", "missing_field", "text", "no 'text' field; the record has: id, image, caption")


def _jsonl_null_image(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "x", "image": None, "text": "t"}) + "\n" + json.dumps({"id": "ok", "image": "a", "text": "t"}))
    return records(path, "jsonl"), ("1", "missing_field", "image", "'image' is null")


def _json_list_no_text(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"id": "ok", "image": "a.png", "text": "t"}, {"id": "x", "image": "a.png"}]))
    return records(path, "jsonl"), ("2", "missing_field", "text", "no 'text' field; the record has: id, image")


def _csv_empty_image(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,image,text\nx,,t\nok,a.png,t\n")
    return records(path, "csv"), ("1", "missing_field", "image", "'image' is empty")


def _parquet_null_text(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["ok", "x"], "image": ["a", "b"], "text": ["t", None]}), path)
    return records(path, "parquet"), ("2", "missing_field", "text", "'text' is null")


def _webdataset_no_text(tmp_path):
    path = tar_file(tmp_path / "s.tar", [("ok.jpg", PNG), ("ok.txt", b"t"),
                                         ("x.jpg", PNG), ("x.json", json.dumps({"id": "x", "title": "t"}).encode())])
    return records(path, "webdataset"), (
        "x", "missing_field", "text",
        "no .txt member and no 'caption'/'text' in .json; the sample has: .jpg, .json; .json keys: id, title")


def _webdataset_no_image(tmp_path):
    path = tar_file(tmp_path / "s.tar", [("ok.jpg", PNG), ("ok.txt", b"t"), ("x.txt", b"t"), ("x.cls", b"3")])
    rows = records(path, "webdataset")
    return rows, ("x", "missing_field", "image", f"no image member (.{', .'.join(manifests.IMAGE_SUFFIXES)}); "
                                                  "the sample has: .txt, .cls")


def _tumemo_json_no_text(tmp_path):
    path = tmp_path / "all.json"
    path.write_text(json.dumps([{"id": "1", "text": "t"}, {"id": "2", "emotion_label": "Happy"}]))
    return records(path, "tumemo_json", images={"1": "/d/1.jpg", "2": "/d/2.jpg"}), (
        "2", "missing_field", "text", "no 'text' field; the record has: id, emotion_label")


@pytest.mark.parametrize("make", [_jsonl_no_text, _jsonl_null_image, _json_list_no_text, _csv_empty_image,
                                  _parquet_null_text, _webdataset_no_text, _webdataset_no_image, _tumemo_json_no_text])
def test_a_record_without_a_field_is_missing_field_naming_what_it_has(tmp_path, make):
    rows, expected = make(tmp_path)
    assert verdict(rows) == expected
    assert sum(not r["reason"] for r in rows) == 1  # the other record is read


# --------------------------------------------------------------------------- 3. wrong types


def _jsonl(tmp_path, bad: dict):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "ok", "image": "a.png", "text": "t"}) + "\n"
                    + json.dumps({"id": "x", "image": "a.png", "text": "t", **bad}) + "\n")
    return records(path, "jsonl")


def _json_list(tmp_path, bad: dict):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"id": "ok", "image": "a.png", "text": "t"}, {"id": "x", "image": "a.png", "text": "t", **bad}]))
    return records(path, "jsonl")


def _tumemo_json(tmp_path, bad: dict):
    path = tmp_path / "all.json"
    path.write_text(json.dumps([{"id": "1", "text": "t"}, {"id": "2", "text": "t", **bad}]))
    return records(path, "tumemo_json", images={"1": "/d/1.jpg", "2": "/d/2.jpg"})


def _webdataset_json(tmp_path, bad: dict):
    meta = {"caption": "t", **bad}
    if "text" in bad:
        meta["caption"] = meta.pop("text")
    path = tar_file(tmp_path / "s.tar", [("a.jpg", PNG), ("a.txt", b"t"), ("b.jpg", PNG), ("b.json", json.dumps(meta).encode())])
    return records(path, "webdataset")


WRONG = [
    ({"text": 123}, "text", "is a number 123; expected a string"),
    ({"text": ["t"]}, "text", "is a list; expected a string"),
    ({"id": True}, "id", "'id' is a boolean true; expected a string or integer"),
    ({"id": {"n": 1}}, "id", "'id' is an object {n}; expected a string or integer"),
    ({"image": 5}, "image", "'image' is a number 5; expected a path string"),
    ({"anps": [1, 2]}, "anps", "'anps' is a number 1; expected a string or a list of strings"),
    ({"label": [1]}, "label", "'label' is a list; expected a string or number"),
    ({"factual_score": True}, "factual_score", "'factual_score' is a boolean true; expected a number"),
    ({"planted_partition": 2.5}, "planted_partition", "'planted_partition' is a number 2.5; expected an integer 1-4"),
]
READERS = {"jsonl": _jsonl, "json-list": _json_list, "tumemo-json": _tumemo_json, "webdataset-json": _webdataset_json}


# TumEmo finds images by id and WebDataset images are tar members (always bytes): neither reads an
# image field, so those pairs are not cases.
WRONG_CASES = [pytest.param(reader, *case, id=f"{reader}-{case[1]}-{i}")
               for reader in READERS for i, case in enumerate(WRONG)
               if not (case[1] == "image" and reader in ("tumemo-json", "webdataset-json"))]


@pytest.mark.parametrize("reader, bad, field, said", WRONG_CASES)
def test_a_value_of_the_wrong_type_is_wrong_type(tmp_path, reader, bad, field, said):
    rows = READERS[reader](tmp_path, bad)
    _, reason, got_field, detail = verdict(rows)
    assert (reason, got_field) == ("wrong_type", field) and said in detail, detail


def test_webdataset_metadata_that_is_not_an_object(tmp_path):
    path = tar_file(tmp_path / "s.tar", [("a.jpg", PNG), ("a.json", b'["a caption"]')])
    assert verdict(records(path, "webdataset"))[1:] == ("wrong_type", "json", "'json' is a list; expected a JSON object")


def test_parquet_row_of_the_wrong_type(tmp_path):
    """Float id columns are accepted (pandas writes nullable integers as float); a non-integral id is wrong_type."""
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [1.0, 1.5], "image": ["a", "b"], "text": ["t", "t"]}), path)
    assert verdict(records(path, "parquet")) == ("2", "wrong_type", "id", "'id' is a float 1.5; expected a string or integer")


def test_csv_cells_are_strings_so_only_their_values_can_be_bad(tmp_path):
    """CSV has no types: a cell that does not parse as the number it should hold is bad_value (as a
    string score is in JSON), never wrong_type."""
    path = tmp_path / "m.csv"
    path.write_text("image,text,factual_score,planted_partition\na,123,0.5,2\nb,t,high,2\nc,t,0.5,2.5\n")
    rows = records(path, "csv")
    assert rows[0]["reason"] is None and rows[0]["text"] == "123"
    assert [(r["reason"], r["field"]) for r in rows[1:]] == [("bad_value", "factual_score"), ("bad_value", "planted_partition")]


def test_wrong_type_is_a_registered_reason():
    assert "wrong_type" in tables.QUARANTINE_REASONS and "bad_value" in tables.QUARANTINE_REASONS


def test_has_records_reads_only_up_to_the_first_record(tmp_path):
    cases = {"a.jsonl": ("\n  \n", False), "b.jsonl": ('\n{"image": "a.png"}\n', True), "c.csv": ("", False),
             "d.csv": ("image,text\n", False), "e.csv": ("image,text\na.png,x\n", True), "f.tsv": ("image\ttext\n", False),
             "g.csv": ("image,caption\n", True)}  # a header problem is reported by check_header, not here
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_text(content)
        kind = {"jsonl": "jsonl", "csv": "csv", "tsv": "tsv"}[name.rsplit(".", 1)[1]]
        assert manifests.has_records(str(tmp_path / name), kind) is expected, name
    pq.write_table(pa.table({"image": pa.array([], pa.string())}), tmp_path / "h.parquet")
    assert manifests.has_records(str(tmp_path / "h.parquet"), "parquet") is False
    (tmp_path / "i.tar").write_bytes(b"")
    assert manifests.has_records(str(tmp_path / "i.tar"), "webdataset") is False
