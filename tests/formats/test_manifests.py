"""pacl_ray.formats.manifests: every reader keeps a fault to its own record (no Ray here)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pacl_ray.formats import manifests, tables
from pacl_ray.formats.manifests import ROW_BITS
from tarfiles import tar_bytes

PNG = b"\x89PNG fake bytes"  # readers never decode images


def records(path, kind, images=None, file_index=0) -> list[dict]:
    return list(manifests.iter_records(str(path), kind, file_index, images))


def verdicts(rows: list[dict]) -> list[tuple]:
    """(row or key, reason, field) of the bad records."""
    return [(r["source"].rsplit(":", 1)[-1].rsplit("#", 1)[-1], r["reason"], r["field"]) for r in rows if r["reason"]]


def good_ids(rows: list[dict]) -> list[str]:
    return [r["id"] for r in rows if not r["reason"]]


# --------------------------------------------------------------------------- writers: one manifest per format


def write_jsonl(tmp_path, rows: list, name="m.jsonl") -> str:
    path = tmp_path / name
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def write_csv(tmp_path, rows: list, name="m.csv") -> str:
    path = tmp_path / name
    out = [b"id,image,text"]
    for r in rows:
        out.append(r if isinstance(r, bytes) else ",".join(f'"{v}"' for v in (r["id"], r["image"], r["text"])).encode())
    path.write_bytes(b"\n".join(out) + b"\n")
    return str(path)


def write_parquet(tmp_path, rows: list, name="m.parquet") -> str:
    path = tmp_path / name
    table = pa.table({
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "image": pa.array([r["image"] for r in rows], pa.string()),
        "text": pa.array([r["text"] if isinstance(r["text"], bytes) else r["text"].encode() for r in rows], pa.binary()),
    })
    pq.write_table(table, path)
    return str(path)


# --------------------------------------------------------------------------- 1. invalid UTF-8 costs its row only


UNDECODABLE = [
    {"id": "a", "image": "a.png", "text": "first"},
    {"id": "b", "image": "b.png", "text": b"caf\xe9 in cp1252"},
    {"id": "c", "image": "c.png", "text": "third"},
    {"id": "d", "image": "d.png", "text": "fourth"},
]


def _jsonl_with_raw_bytes(tmp_path):
    rows = [r if not isinstance(r["text"], bytes) else b'{"id": "b", "image": "b.png", "text": "' + r["text"] + b'"}'
            for r in UNDECODABLE]
    return write_jsonl(tmp_path, rows), "jsonl"


def _csv_with_raw_bytes(tmp_path):
    rows = [r if not isinstance(r["text"], bytes) else b'b,b.png,"' + r["text"] + b'"' for r in UNDECODABLE]
    return write_csv(tmp_path, rows), "csv"


@pytest.mark.parametrize("make", [_jsonl_with_raw_bytes, _csv_with_raw_bytes], ids=["jsonl", "csv"])
def test_undecodable_row_is_attributed(tmp_path, make):
    path, kind = make(tmp_path)
    rows = records(path, kind)
    assert good_ids(rows) == ["a", "c", "d"]
    assert verdicts(rows) == [("2", "undecodable_text", "text")]
    assert [r["source"] for r in rows] == [f"{path}:{i}" for i in (1, 2, 3, 4)]


def test_undecodable_parquet_text_is_left_for_validation(tmp_path):
    """Binary Parquet text stays bytes; validation (ingest.decode_text) quarantines it."""
    rows = records(write_parquet(tmp_path, UNDECODABLE), "parquet")
    assert [r["text_bytes"] for r in rows][1] == b"caf\xe9 in cp1252" and not verdicts(rows)


def test_undecodable_image_path_names_the_field(tmp_path):
    path = write_jsonl(tmp_path, [b'{"id": "x", "image": "caf\xe9.png", "text": "t"}', {"id": "y", "image": "y.png", "text": "t"}])
    rows = records(path, "jsonl")
    assert verdicts(rows) == [("1", "undecodable_text", "image")] and good_ids(rows) == ["y"]


# --------------------------------------------------------------------------- 2. cut-off and malformed records


def test_jsonl_cut_off_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"id": "a", "image": "a.png", "text": "x"}\n\n{"id": "b", "image": "b.png", "text": "y"}\n{"id": "c", "ima')
    rows = records(path, "jsonl")
    assert good_ids(rows) == ["a", "b"]
    assert verdicts(rows) == [("4", "malformed_record", "record")]  # row = line number


@pytest.mark.parametrize("line, why", [(b"[1, 2]", "a JSON list"), (b"not json", "not valid JSON")])
def test_jsonl_non_object_lines(tmp_path, line, why):
    path = write_jsonl(tmp_path, [line, {"id": "a", "image": "a.png", "text": "x"}])
    rows = records(path, "jsonl")
    assert verdicts(rows) == [("1", "malformed_record", "record")] and why in rows[0]["detail"]
    assert good_ids(rows) == ["a"]


def test_json_error_details_read_naturally(tmp_path):
    path = write_jsonl(tmp_path, [b'{"id": "a", "image": "a.png", "text": "unterminated}', b'{"id": 1,}'])
    rows = records(path, "jsonl")
    assert rows[0]["detail"] == "line 1: not valid JSON (Unterminated string starting at column 39)"
    assert rows[1]["detail"] == "line 2: not valid JSON (Expecting property name enclosed in double quotes at column 10)"
    listed = tmp_path / "m.json"
    listed.write_text('[{"id": "a", "text": "cut}]')
    (bad,) = records(listed, "jsonl")
    assert "(Unterminated string starting at line 1 column 22)" in bad["detail"] and "at at" not in bad["detail"]


def test_json_list_cut_off(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('[{"id": "a", "image": "a.png", "text": "x"}, {"id": "b", "image": "b.png", "text": "y"}, {"id": "c", "te')
    rows = records(path, "jsonl")
    assert good_ids(rows) == ["a", "b"] and verdicts(rows) == [("3", "malformed_record", "record")]


def test_csv_malformed_rows_cost_only_themselves(tmp_path):
    path = write_csv(tmp_path, [
        {"id": "a", "image": "a.png", "text": "x"},
        b'b,b.png,"broken"quote',  # strict RFC 4180: text after a closing quote
        b"c,c.png",  # too few fields
        b"d,d.png,x,extra",  # too many
        {"id": "e", "image": "e.png", "text": "fine"},
        b'f,f.png,"never closed',  # an open quote to the end of the file
    ])
    rows = records(path, "csv")
    assert good_ids(rows) == ["a", "e"]
    assert verdicts(rows) == [(str(i), "malformed_record", "record") for i in (2, 3, 4, 6)]


def test_csv_open_quote_mid_file_resumes_on_the_next_line(tmp_path):
    path = write_csv(tmp_path, [
        {"id": "a", "image": "a.png", "text": "x"},
        b'b,b.png,"opens and never closes',
        {"id": "c", "image": "c.png", "text": "after"},
        {"id": "d", "image": "d.png", "text": "more"},
    ])
    rows = records(path, "csv")
    assert verdicts(rows) == [("2", "malformed_record", "record")]
    assert good_ids(rows) == ["a", "c", "d"]
    assert rows[-1]["source"].endswith(":4")


def test_truncated_tar_costs_its_last_sample(tmp_path):
    data = tar_bytes([("k1.png", PNG), ("k1.txt", b"one"), ("k2.png", PNG * 200), ("k2.txt", b"two")])
    path = tmp_path / "s.tar"
    path.write_bytes(data[:3560])  # k1.png, k1.txt, then 1000 of k2.png's 3000 bytes
    rows = records(path, "webdataset")
    assert good_ids(rows) == ["k1"]
    assert [(r["id"], r["reason"]) for r in rows if r["reason"]] == [("k2", "malformed_record")]
    path.write_bytes(data[:2100])  # cut inside k2.png's header: nothing of k2 to name, but said
    rows = records(path, "webdataset")
    assert good_ids(rows) == ["k1"] and [(r["reason"], r["field"]) for r in rows if r["reason"]] == [("malformed_record", "shard")]


def test_unreadable_parquet_file(tmp_path):
    path = tmp_path / "m.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    rows = records(path, "parquet")
    assert [(r["reason"], r["field"]) for r in rows] == [("unreadable_file", "manifest")]


# --------------------------------------------------------------------------- 3. big RFC 4180 CSV


def test_csv_over_a_mebibyte_with_quoted_newlines_and_commas(tmp_path):
    texts = [f"post {i}, with a comma\nand a newline, \"quoted\" words {'x' * 400}" for i in range(2600)]
    path = tmp_path / "big.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        import csv

        writer = csv.writer(handle)
        writer.writerow(["id", "image", "text"])
        for i, text in enumerate(texts):
            writer.writerow([f"{i:05d}", "a.png", text])
    assert path.stat().st_size > 2**20
    rows = records(path, "csv")
    assert len(rows) == 2600 and not verdicts(rows)
    assert [r["text"] for r in rows] == texts and rows[7]["id"] == "00007"


def test_utf16_csv_from_a_spreadsheet(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes("id\timage\ttext\r\n01\ta.png\tcafé\r\n".encode("utf-16"))
    rows = records(path, "tsv")
    assert [(r["id"], r["text"]) for r in rows] == [("01", "café")]


# --------------------------------------------------------------------------- 6. inline image bytes in Parquet


def test_parquet_inline_image_bytes(tmp_path):
    binary = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"id": ["a"], "image": pa.array([PNG], pa.binary()), "text": ["t"]}), binary)
    (row,) = records(binary, "parquet")
    assert (row["image_bytes"], row["image_ref"], row["reason"]) == (PNG, None, None)

    struct = tmp_path / "hf.parquet"
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([{"bytes": PNG, "path": "orig.png"}, {"bytes": None, "path": "on_disk.png"}], image_type)
    pq.write_table(pa.table({"id": ["a", "b"], "image": images, "text": ["t", "u"]}), struct)
    first, second = records(struct, "parquet")
    assert first["image_bytes"] == PNG and "orig.png" in first["image_name"]
    assert second["image_bytes"] is None and second["image_ref"] == str(tmp_path / "on_disk.png")


def test_inline_bytes_without_id_hash_the_bytes(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": pa.array([PNG, PNG + b"2", PNG], pa.binary()), "text": ["t", "t", "t"]}), path)
    ids = [r["id"] for r in records(path, "parquet")]
    assert ids[0] == ids[2] != ids[1]


# --------------------------------------------------------------------------- 10. ids exactly as written

IDS = ["01", "1", "007", "000000"]


def _ids_jsonl(tmp_path):
    return write_jsonl(tmp_path, [{"id": i, "image": "a.png", "text": "t"} for i in IDS]
                       + [b'{"id": 10, "image": "a.png", "text": "t"}', b'{"id": 1.50, "image": "a.png", "text": "t"}']), "jsonl"


def _ids_csv(tmp_path):
    return write_csv(tmp_path, [{"id": i, "image": "a.png", "text": "t"} for i in IDS]
                     + [b"10,a.png,t", b"1.50,a.png,t"]), "csv"


def _ids_parquet(tmp_path):
    return write_parquet(tmp_path, [{"id": i, "image": "a.png", "text": "t"} for i in IDS + ["10", "1.50"]]), "parquet"


@pytest.mark.parametrize("make", [_ids_jsonl, _ids_csv, _ids_parquet], ids=["jsonl", "csv", "parquet"])
def test_ids_are_kept_exactly_as_written(tmp_path, make):
    path, kind = make(tmp_path)
    assert good_ids(records(path, kind)) == IDS + ["10", "1.50"]


def test_integer_parquet_ids(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": pa.array([7, None, 9], pa.int64()), "image": ["a", "b", "c"], "text": ["x", "y", "z"]}), path)
    ids = [r["id"] for r in records(path, "parquet")]
    assert ids[0] == "7" and ids[2] == "9" and len(ids[1]) == 16  # a missing id -> content hash


# --------------------------------------------------------------------------- 11. wrongly-typed values


@pytest.mark.parametrize(
    "row, reason, field",
    [
        ({"id": True, "image": "a.png", "text": "t"}, "wrong_type", "id"),
        ({"id": ["x"], "image": "a.png", "text": "t"}, "wrong_type", "id"),
        ({"id": "x", "image": 5, "text": "t"}, "wrong_type", "image"),
        ({"id": "x", "image": "a.png", "text": ["t"]}, "wrong_type", "text"),
        ({"id": "x", "image": "a.png", "text": "t", "factual_score": "high"}, "bad_value", "factual_score"),
        ({"id": "x", "image": "a.png", "text": "t", "planted_partition": 7}, "bad_value", "planted_partition"),
        ({"id": "x", "image": "a.png", "text": "t", "anps": {"a": 1}}, "wrong_type", "anps"),
    ],
)
def test_wrongly_typed_values_are_wrong_type_and_bad_values_bad_value(tmp_path, row, reason, field):
    """A value of the wrong type is wrong_type; a value of an accepted type that is not allowed
    (an unparsable score string, a partition outside 1-4) is bad_value."""
    path = write_jsonl(tmp_path, [row, {"id": "ok", "image": "a.png", "text": "t"}])
    rows = records(path, "jsonl")
    assert verdicts(rows) == [("1", reason, field)] and good_ids(rows) == ["ok"]


def test_optional_columns(tmp_path):
    path = write_jsonl(tmp_path, [{"id": "a", "image": "a.png", "text": "t", "anps": ["happy dog", " ", "sunny beach"],
                                   "factual_score": 0.25, "emotional_score": "0.5", "emotion_label": "Happy",
                                   "planted_partition": 3}])
    (row,) = records(path, "jsonl")
    assert (row["anps"], row["factual_score"], row["emotional_score"], row["label"], row["planted_partition"]) == (
        "happy dog; sunny beach", 0.25, 0.5, "Happy", 3)


# --------------------------------------------------------------------------- positions, WebDataset, TumEmo


def test_positions_order_by_file_then_row(tmp_path):
    path = write_jsonl(tmp_path, [{"id": str(i), "image": "a.png", "text": "t"} for i in range(3)])
    rows = records(path, "jsonl", file_index=5)
    assert [r["position"] for r in rows] == [(5 << ROW_BITS) | i for i in (1, 2, 3)]


def test_webdataset_members_and_hidden_entries(tmp_path):
    path = tmp_path / "s.tar"
    path.write_bytes(tar_bytes([
        ("./000001.jpg", PNG), ("./000001.txt", b"caption"),
        ("._000001.jpg", b"macOS resource fork"), ("__MACOSX/000002.jpg", b"junk"),
        ("000002.png", PNG), ("000002.json", json.dumps({"caption": "from json", "id": "007"}).encode()),
        ("000003.jpg", PNG), ("000003.json", b"{not json"),
    ]))
    rows = records(path, "webdataset")
    assert [(r["id"], r["reason"]) for r in rows] == [("000001", None), ("007", None), ("000003", "malformed_record")]
    assert rows[0]["source"] == f"{path}#000001" and rows[0]["text_bytes"] == b"caption"
    assert rows[1]["text"] == "from json"


def test_tumemo_json_list_attaches_images(tmp_path):
    path = tmp_path / "all.json"
    path.write_text(json.dumps([{"id": "01", "text": "a", "emotion_label": "Happy"}, {"id": "2", "text": "b"}]))
    rows = records(path, "tumemo_json", images={"01": "/d/01.jpg"})
    assert [(r["id"], r["image_ref"], r["label"], r["reason"]) for r in rows] == [
        ("01", "/d/01.jpg", "Happy", None), ("2", None, None, "missing_file")]


@pytest.mark.parametrize(
    "name, hidden",
    [(".DS_Store", True), ("._a.jpg", True), ("__MACOSX/happy/._1.jpg", True), ("Thumbs.db", True),
     ("@eaDir/x.jpg", True), ("./a.jpg", False), ("happy/1.jpg", False), ("a.b.jpg", False)],
)
def test_is_hidden(name, hidden):
    assert manifests.is_hidden(name) is hidden


def test_reasons_are_registered():
    assert "malformed_record" in tables.QUARANTINE_REASONS
    with pytest.raises(AssertionError):
        manifests.Rejected("not_a_reason", "x")
