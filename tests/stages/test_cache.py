"""pacl_ray.stages.cache: the one stage prologue (run_cached), unique staging + atomic publish,
completion records with sizes and checksums, and readers that refuse damaged files."""

from __future__ import annotations

import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pacl_ray.config import RunConfig
from pacl_ray.formats import storage
from pacl_ray.stages import cache


def _table(value: int, rows: int = 200) -> pa.Table:
    return pa.table({"id": [f"r{i}" for i in range(rows)], "x": np.full(rows, value, dtype=np.int64)})


def _builder(value: int, calls: list, barrier: threading.Barrier | None = None):
    def build(uri: str) -> dict:
        calls.append(uri)
        storage.write_parquet(_table(value), storage.join(uri, "t"), "part-0.parquet")
        if barrier is not None:
            barrier.wait(timeout=30)  # both runs have written their first file before either goes on
        storage.write_parquet(_table(value), storage.join(uri, "t"), "part-1.parquet")
        storage.write_text(storage.join(uri, "note.txt"), f"written by run {value}")
        return {"value": value}

    return build


def test_run_cached_publishes_once_and_prints_its_summary_once(tmp_path, capsys):
    out_dir, calls = str(tmp_path), []
    describe = lambda s: f"stage t: value {s['value']}"  # noqa: E731
    first = cache.run_cached(out_dir, "t", "k1", _builder(7, calls), config=RunConfig(), describe=describe)
    assert not first.cached and first.uri == cache.stage_uri(out_dir, "t", "k1")
    assert capsys.readouterr().out == "stage t: value 7\n"
    record = cache.read_record(first.uri)
    assert record["summary"] == {"value": 7}
    assert sorted(record["files"]) == ["config.yaml", "note.txt", "t/part-0.parquet", "t/part-1.parquet"]
    size = os.path.getsize(first.path("t", "part-0.parquet"))
    assert record["files"]["t/part-0.parquet"]["size"] == size and len(record["files"]["note.txt"]["sha256"]) == 64
    # The staging directory is gone; nothing but the published key is left.
    assert sorted(os.listdir(tmp_path / "stages" / "t")) == ["k1"]

    again = cache.run_cached(out_dir, "t", "k1", _builder(8, calls), describe=describe)
    assert again.cached and again.uri == first.uri and len(calls) == 1
    assert capsys.readouterr().out == "stage t: value 7 [cached]\n"
    assert cache.read_table(again, "t").column("x").to_pylist() == [7] * 400


def test_concurrent_runs_of_one_stage_give_one_clean_result(tmp_path):
    out_dir, calls, results, errors = str(tmp_path), [], [None, None], []
    barrier = threading.Barrier(2)

    def run(i: int) -> None:
        try:
            results[i] = cache.run_cached(out_dir, "t", "k", _builder(i + 1, calls, barrier))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(calls) == 2 and calls[0] != calls[1]  # both built, each in its own staging
    assert results[0].uri == results[1].uri == cache.stage_uri(out_dir, "t", "k")
    # Every file comes from the same run, and the record describes exactly those files.
    table = cache.read_table(results[0], "t")
    winner = int(table.column("x")[0].as_py())
    assert table.column("x").to_pylist() == [winner] * 400
    assert (tmp_path / "stages" / "t" / "k" / "note.txt").read_text() == f"written by run {winner}"
    assert cache.lookup(out_dir, "t", "k") is not None
    assert sorted(os.listdir(tmp_path / "stages" / "t")) == ["k"]


def test_failed_build_publishes_nothing(tmp_path):
    def build(uri: str) -> dict:
        storage.write_text(storage.join(uri, "half.txt"), "x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.run_cached(str(tmp_path), "t", "k", build)
    assert cache.lookup(str(tmp_path), "t", "k") is None
    assert os.listdir(tmp_path / "stages" / "t") == []


def test_truncated_parquet_in_a_finished_stage_is_redone(tmp_path, capsys):
    out_dir, calls = str(tmp_path), []
    out = cache.run_cached(out_dir, "t", "k", _builder(3, calls))
    path = out.path("t", "part-1.parquet")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])

    # A reader holding the output resolved before the damage gets the file's name, not a traceback.
    with pytest.raises(cache.StageDataError, match="part-1.parquet: size"):
        cache.read_table(out, "t")
    capsys.readouterr()
    redone = cache.run_cached(out_dir, "t", "k", _builder(4, calls))
    assert len(calls) == 2 and not redone.cached
    assert cache.read_table(redone, "t").column("x").to_pylist() == [4] * 400


def test_truncation_is_seen_at_lookup(tmp_path, capsys):
    out_dir, calls = str(tmp_path), []
    out = cache.run_cached(out_dir, "t", "k", _builder(3, calls))
    path = out.path("t", "part-0.parquet")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:100])
    assert cache.lookup(out_dir, "t", "k") is None
    assert "part-0.parquet: size 100 bytes" in capsys.readouterr().out
    assert not cache.run_cached(out_dir, "t", "k", _builder(5, calls)).cached and len(calls) == 2


def test_flipped_byte_is_detected_and_the_stage_redone_next_time(tmp_path):
    out_dir, calls = str(tmp_path), []
    cache.run_cached(out_dir, "t", "k", _builder(3, calls))
    out = cache.lookup(out_dir, "t", "k")  # sizes match: the damage is invisible to a listing
    path = out.path("t", "part-0.parquet")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 0x01
    open(path, "wb").write(bytes(data))
    assert cache.lookup(out_dir, "t", "k") is not None
    with pytest.raises(cache.StageDataError, match=r"part-0\.parquet: content differs .*next run redoes"):
        cache.read_table(out, "t")
    assert cache.lookup(out_dir, "t", "k") is None  # the record was invalidated
    assert os.path.exists(out.path(cache.INVALID)) and os.path.exists(path)  # files kept for inspection
    assert not cache.run_cached(out_dir, "t", "k", _builder(6, calls)).cached and len(calls) == 2


def test_readers_ignore_stray_files_and_name_missing_columns(tmp_path):
    out = cache.run_cached(str(tmp_path), "t", "k", _builder(3, []))
    pq.write_table(_table(99), out.path("t", "stray.parquet"))  # not in the record
    assert cache.read_table(out, "t").column("x").to_pylist() == [3] * 400
    with pytest.raises(cache.StageDataError, match=r"part-0\.parquet: missing column 'nope'"):
        cache.read_table(out, "t", columns=["nope"])


def test_table_dir_for_ray_data_refuses_files_the_record_does_not_list(tmp_path):
    out = cache.run_cached(str(tmp_path), "t", "k", _builder(3, []))
    assert cache.table_dir(out, "t") == out.path("t")
    pq.write_table(_table(99), out.path("t", "stray.parquet"))
    with pytest.raises(cache.StageDataError, match=r"stray\.parquet: not in the stage's completion record"):
        cache.table_dir(out, "t")
    os.remove(out.path("t", "stray.parquet"))
    open(out.path("t", "part-1.parquet"), "ab").write(b"x")
    with pytest.raises(cache.StageDataError, match=r"part-1\.parquet: size"):
        cache.table_dir(out, "t")


def test_hand_made_outputs_without_a_record_are_read_unchecked(tmp_path):
    storage.write_parquet(_table(1), str(tmp_path / "x" / "t"))
    out = cache.StageOutput("t", "k", str(tmp_path / "x"), cached=False)
    assert cache.read_table(out, "t").num_rows == 200
    path = str(tmp_path / "x" / "t" / "part-00000.parquet")
    open(path, "wb").write(open(path, "rb").read()[:50])
    with pytest.raises(cache.StageDataError, match="part-00000.parquet: not a readable Parquet file"):
        cache.read_table(out, "t")


def test_in_place_marker_keeps_its_summary_and_lists_files(tmp_path):
    uri = str(tmp_path / "d")
    storage.write_text(storage.join(uri, "a.txt"), "abc")
    cache.mark_complete(uri, {"rows": 3})
    assert cache.read_summary(uri) == {"rows": 3}
    assert cache.read_record(uri)["files"]["a.txt"]["size"] == 3
    # A marker written by an older version (a bare summary) still reads as complete.
    storage.write_text(storage.join(uri, cache.SUCCESS), '{"rows": 4}')
    assert cache.read_summary(uri) == {"rows": 4} and cache.read_record(uri)["files"] is None


def test_failed_build_can_keep_its_staging_for_inspection(tmp_path):
    seen = []

    def build(uri: str) -> dict:
        seen.append(uri)
        storage.write_text(storage.join(uri, "quarantine.txt"), "bad rows")
        raise ValueError(f"every record is bad; see {uri}")

    with pytest.raises(ValueError, match="every record is bad"):
        cache.run_cached(str(tmp_path), "t", "k", build, keep_failed=True)
    assert cache.lookup(str(tmp_path), "t", "k") is None
    assert open(storage.join(seen[0], "quarantine.txt")).read() == "bad rows"
