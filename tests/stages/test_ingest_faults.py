"""pacl_ray.stages.ingest: one fault, one outcome, in every reader; what the user is told.

* an empty or blank text is empty_text and an absent one missing_field, whatever the format
  (reader + validation, no Ray);
* a whole-file header/schema problem stops ingest before Ray starts, with one line naming the
  file, the column and the columns found, and nothing written (no Ray);
* a run whose every record is bad publishes nothing and leaves no hidden staging directory; its
  quarantine is kept where the error says; a run that succeeds names the published quarantine (Ray).
"""

from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pacl_ray import cli
from pacl_ray.config import RunConfig
from pacl_ray.formats import manifests
from pacl_ray.stages import ingest
from pacl_ray.stages.ingest import IngestError, run_ingest
from tarfiles import tar_file

PNG = b"\x89PNG fake bytes"


def validated(path, kind, images=None) -> list[tuple[str, str, str]]:
    """(row or key, reason, field) of every record after reading and validation (no image is
    read: text is validated first)."""
    out = []
    for record in manifests.iter_records(str(path), kind, 0, images):
        row = ingest.validate_record(record, 10**8, True)
        out.append((row["source"].rsplit(":", 1)[-1].rsplit("#", 1)[-1].rsplit("/", 1)[-1], row["reason"], row["field"]))
    return out


# --------------------------------------------------------------------------- 2. empty vs absent text


def _jsonl(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"image": "a", "text": ""}, {"image": "a", "text": " \t"}, {"image": "a"}, {"image": "a", "text": None}]))
    return validated(path, "jsonl"), ["1", "2"], ["3", "4"]


def _json_list(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"image": "a", "text": ""}, {"image": "a", "text": " "}, {"image": "a"}]))
    return validated(path, "jsonl"), ["1", "2"], ["3"]


def _csv(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('image,text\na,\na,""\na," "\n')
    return validated(path, "csv"), ["1", "2", "3"], []


def _tsv(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text("image\ttext\na\t\na\t  \n")
    return validated(path, "tsv"), ["1", "2"], []


def _parquet(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": ["a", "a", "a"], "text": ["", " ", None]}), path)
    return validated(path, "parquet"), ["1", "2"], ["3"]


def _parquet_binary(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": ["a", "a"], "text": pa.array([b"", None], pa.binary())}), path)
    return validated(path, "parquet"), ["1"], ["2"]


def _webdataset(tmp_path):
    path = tar_file(tmp_path / "s.tar", [
        ("a.jpg", PNG), ("a.txt", b""), ("b.jpg", PNG), ("b.json", json.dumps({"caption": " "}).encode()),
        ("c.jpg", PNG), ("c.json", json.dumps({"id": "c"}).encode()), ("d.jpg", PNG)])
    return validated(path, "webdataset"), ["a", "b"], ["c", "d"]


def _tumemo_text(tmp_path):
    (tmp_path / "1.txt").write_text("")
    (tmp_path / "2.txt").write_text("  \n")
    rows = [r for f in ("1.txt", "2.txt") for r in validated(tmp_path / f, "tumemo_text", {"1": "x.jpg", "2": "y.jpg"})]
    return rows, ["1.txt", "2.txt"], []


def _tumemo_json(tmp_path):
    path = tmp_path / "all.json"
    path.write_text(json.dumps([{"id": "1", "text": ""}, {"id": "2"}]))
    return validated(path, "tumemo_json", {"1": "x.jpg", "2": "y.jpg"}), ["1"], ["2"]


@pytest.mark.parametrize("make", [_jsonl, _json_list, _csv, _tsv, _parquet, _parquet_binary, _webdataset,
                                  _tumemo_text, _tumemo_json])
def test_empty_text_is_empty_text_and_absent_text_missing_field_in_every_format(tmp_path, make):
    rows, empty, absent = make(tmp_path)
    assert len(rows) == len(empty) + len(absent)
    assert {where: (reason, field) for where, reason, field in rows} == {
        **{w: ("empty_text", "text") for w in empty}, **{w: ("missing_field", "text") for w in absent}}


# --------------------------------------------------------------------------- 1. whole-file problems (no Ray)


def make_cfg(output_dir, manifest) -> RunConfig:
    cfg = RunConfig(output_dir=str(output_dir))
    cfg.ingest.manifest = str(manifest)
    return cfg


def _bad_csv(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,image,caption\n1,a.jpg,hello\n")
    return path, "no column 'text' (columns found: id, image, caption;"


def _bad_parquet(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": ["a.jpg"], "text": pa.array([7], pa.int64())}), path)
    return path, "column 'text' is integer, expected string"


@pytest.mark.parametrize("make", [_bad_csv, _bad_parquet], ids=["csv-header", "parquet-schema"])
def test_a_whole_file_problem_stops_ingest_before_anything_is_written(tmp_path, monkeypatch, make):
    manifest, said = make(tmp_path)
    monkeypatch.setattr("pacl_ray.stages.runtime.init_ray", lambda *a, **k: pytest.fail("Ray started"))
    with pytest.raises(IngestError) as info:
        run_ingest(make_cfg(tmp_path / "runs", manifest))
    assert str(info.value).startswith(f"ingest.manifest: {manifest}: {said}")
    assert not (tmp_path / "runs" / "stages").exists()


def test_the_cli_says_it_in_one_line(ray_local, tmp_path, capsys):
    """The CLI starts Ray before the stage (its progress lines may come first); the error is one line."""
    manifest, _ = _bad_csv(tmp_path)
    status = cli.main(["ingest", "--manifest", str(manifest), "--output-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2
    assert err.startswith(f"pacl-ray ingest: IngestError: ingest.manifest: {manifest}: no column 'text'")
    assert "'caption' -> 'text'" in err


def test_every_bad_file_of_a_folder_is_counted(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "a.csv").write_text("image,text\na.jpg,fine\n")
    for name in ("b.csv", "c.csv"):
        (folder / name).write_text("image,caption\na.jpg,x\n")
    with pytest.raises(IngestError, match=r"b\.csv: no column 'text'.*\(and 1 more file\(s\) with a header or schema problem\)"):
        run_ingest(make_cfg(tmp_path / "runs", folder))


# --------------------------------------------------------------------------- 4. where the quarantine is (Ray)


def _entries(folder) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_failed_and_finished_runs_name_where_the_quarantine_is(ray_local, tmp_path, capsys):
    runs = tmp_path / "runs"
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buffer, "PNG")
    (tmp_path / "a.png").write_bytes(buffer.getvalue())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "missing.png", "text": "x"}) + "\n" + json.dumps({"image": "a.png", "text": 5}) + "\n")
    with pytest.raises(IngestError, match="every record") as info:
        run_ingest(make_cfg(runs, bad))
    key = ingest.ingest_key(make_cfg(runs, bad), ingest.expand_inputs(str(bad)), "jsonl")
    kept = ingest.failed_uri(str(runs), key)
    assert f"is kept for inspection in {kept}/quarantine" in str(info.value)
    assert _entries(runs / "stages" / "ingest") == [f"{key}.failed"]  # no hidden staging dir, nothing published
    quarantine = pq.read_table(f"{kept}/quarantine").to_pylist()
    assert sorted((q["reason"], q["field"]) for q in quarantine) == [("missing_file", "image"), ("wrong_type", "text")]

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"image": "a.png", "text": "fine"}) + "\n" + json.dumps({"image": "a.png", "text": ""}) + "\n")
    capsys.readouterr()
    out = run_ingest(make_cfg(runs, good))
    printed = capsys.readouterr().out
    assert f"quarantined records (source file:row, field, reason, detail) are in {out.path('quarantine')}" in printed
    assert not [e for e in _entries(runs / "stages" / "ingest") if e.startswith(".")]


# --------------------------------------------------------------------------- 5. empty manifests (Ray)


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("empty.csv", ""), ("header.csv", "id,image,text\n"),
                                           ("blank.jsonl", "\n \n"), ("rows.parquet", None)])
def test_an_empty_manifest_is_one_clean_error_before_ray_starts(tmp_path, monkeypatch, name, content):
    manifest = tmp_path / name
    if content is None:
        pq.write_table(pa.table({"image": pa.array([], pa.string()), "text": pa.array([], pa.string())}), manifest)
    else:
        manifest.write_text(content)
    monkeypatch.setattr("pacl_ray.stages.runtime.init_ray", lambda *a, **k: pytest.fail("Ray started"))
    with pytest.raises(IngestError) as info:
        run_ingest(make_cfg(tmp_path / "runs", manifest))
    assert str(info.value) == f"ingest.manifest: no records in {manifest}"


def test_no_records_found_by_ray_stop_before_the_duplicate_steps(ray_local, tmp_path, monkeypatch):
    """An empty JSON list passes the cheap check; the count after validation stops it before the
    duplicate-id and tally steps (which, given Ray Data's schema-less empty blocks, used to print a
    worker traceback before the error)."""
    manifest = tmp_path / "empty.json"
    manifest.write_text("[]\n")
    monkeypatch.setattr(ingest, "find_duplicates", lambda *a: pytest.fail("the duplicate step ran"))
    with pytest.raises(IngestError) as info:
        run_ingest(make_cfg(tmp_path / "runs", manifest))
    assert str(info.value) == f"ingest.manifest: no records in {manifest}"


def test_an_empty_file_among_good_ones_is_fine(ray_local, tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buffer, "PNG")
    folder = tmp_path / "parts"
    folder.mkdir()
    (tmp_path / "a.png").write_bytes(buffer.getvalue())  # outside: a folder of images and JSON reads as TumEmo
    (folder / "a.jsonl").write_text(json.dumps({"id": "1", "image": "../a.png", "text": "fine"}) + "\n")
    (folder / "b.jsonl").write_text("")
    out = run_ingest(make_cfg(tmp_path / "runs", folder))
    assert pq.read_table(out.path("pairs")).column("id").to_pylist() == ["1"]


def test_the_duplicate_index_skips_schemaless_empty_blocks():
    """Ray Data may hand over an empty block without any column: it holds no id to index."""
    block = pa.Table.from_pylist([{"id": "a", "position": 1, "source": "m:1", "reason": None},
                                  {"id": "a", "position": 2, "source": "m:2", "reason": None}])
    index = ingest.index_duplicates(lambda: iter([pa.table({}), block, pa.table({})]))
    assert index.to_pylist() == [{"id": "a", "first_position": 1, "first_source": "m:1"}]
    assert ingest.index_duplicates(lambda: iter([pa.table({})])).num_rows == 0
