"""pacl_ray.stages.ingest: every quarantine reason on crafted bad files, every input format, caching."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pacl_ray.stages import cache
from pacl_ray.formats import manifests, tables
from pacl_ray.config import RunConfig
from pacl_ray.stages import ingest
from pacl_ray.stages.ingest import (
    IngestError,
    Rejected,
    check_image,
    decode_text,
    detect_format,
    read_image_file,
    read_pairs_table,
    run_ingest,
)


def encode(mode="RGB", size=(24, 24), fmt="PNG", color=None) -> bytes:
    color = color if color is not None else {"RGB": (200, 30, 30), "CMYK": (0, 50, 100, 0), "L": 128,
                                            "LA": (128, 100), "RGBA": (10, 20, 30, 0), "P": 3}[mode]
    image = Image.new(mode, size, color)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def read_quarantine(out: cache.StageOutput) -> pa.Table:
    return pq.read_table(out.path("quarantine"))


def reasons(out: cache.StageOutput) -> dict:
    counts: dict = {}
    for reason in read_quarantine(out).column("reason").to_pylist():
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def make_cfg(output_dir: str, manifest, **ingest) -> RunConfig:
    cfg = RunConfig(output_dir=output_dir)
    cfg.ingest.manifest = str(manifest)
    for key, value in ingest.items():
        setattr(cfg.ingest, key, value)
    return cfg


# --------------------------------------------------------------------------- pure validation


def test_rgb_image_bytes_are_kept():
    data = encode("RGB", (30, 20), "JPEG")
    assert check_image(data, 10**6) == (data, 30, 20, None)


@pytest.mark.parametrize("mode, fmt", [("CMYK", "JPEG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGBA", "PNG")])
def test_non_rgb_modes_are_converted(mode, fmt):
    data, width, height, converted_from = check_image(encode(mode, fmt=fmt), 10**6)
    image = Image.open(io.BytesIO(data))
    assert (image.mode, image.format, width, height, converted_from) == ("RGB", fmt, 24, 24, mode)


def test_transparent_pixels_become_white():
    data, *_ = check_image(encode("RGBA"), 10**6)  # fully transparent
    assert Image.open(io.BytesIO(data)).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    "data, limit, reason",
    [
        (b"", 10**6, "zero_size_image"),
        (b"this is not an image at all", 10**6, "corrupt_image"),
        (encode("RGB", (64, 64), "JPEG")[:300], 10**6, "truncated_image"),
        (encode("RGB", (101, 100)), 5_000, "decompression_bomb"),  # Pillow warns above the limit
        (encode("RGB", (200, 200)), 5_000, "decompression_bomb"),  # and raises above twice it
    ],
)
def test_bad_images(data, limit, reason):
    with pytest.raises(Rejected) as info:
        check_image(data, limit)
    assert info.value.reason == reason and info.value.field == "image"


def test_a_bomb_detail_cites_the_configured_limit_and_its_key():
    for size in ((101, 100), (200, 200)):  # Pillow warns above the limit and raises above twice it
        with pytest.raises(Rejected) as info:
            check_image(encode("RGB", size), 5_000)
        assert info.value.detail.startswith(f"{size[0] * size[1]:,} pixels exceeds the limit of 5,000 pixels")
        assert "ingest.max_image_pixels" in info.value.detail


def test_bomb_limit_is_restored():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(Rejected):
        check_image(encode("RGB", (101, 100)), 5_000)
    assert Image.MAX_IMAGE_PIXELS == before


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(Rejected, match="missing_file"):
        read_image_file(str(tmp_path / "nope.jpg"))
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(Rejected, match="unreadable_file"):
        read_image_file(str(tmp_path / "dir.jpg"))


@pytest.mark.parametrize(
    "text, raw, reason",
    [(None, None, "missing_field"), ("", None, "empty_text"), (" \t\n", None, "empty_text"),
     (None, b"caf\xe9 \xff", "undecodable_text"), (None, b"   ", "empty_text")],
)
def test_bad_texts(text, raw, reason):
    with pytest.raises(Rejected) as info:
        decode_text(text, raw)
    assert info.value.reason == reason


def test_text_bytes_are_decoded():
    assert decode_text(None, "café".encode("utf-8")) == "café"


def test_store_image_resizes_and_records_the_original_size():
    big = encode("RGB", (1200, 300), "PNG")
    kept = ingest.store_image(big, 10**7, max_image_side=400)
    assert (kept.width, kept.height, kept.original_width, kept.original_height) == (400, 100, 1200, 300)
    assert Image.open(io.BytesIO(kept.data)).format == "JPEG"
    small = encode("RGB", (30, 20), "JPEG")
    assert ingest.store_image(small, 10**6, max_image_side=400).data == small
    with pytest.raises(Rejected) as info:  # the bomb limit still applies to the full-size image
        ingest.store_image(encode("RGB", (200, 200)), 5_000, max_image_side=50)
    assert info.value.reason == "decompression_bomb"


def test_validated_rows_carry_the_original_size():
    record = manifests.blank_record("m.jsonl", 7)
    record.update(id="a", text="a post", image_bytes=encode("RGB", (900, 600), "JPEG"))
    resized = ingest.validate_batch(pa.Table.from_pylist([record], schema=manifests.RECORD), 10**7, True,
                                    max_image_side=300).to_pylist()[0]
    assert resized["reason"] is None
    assert (resized["width"], resized["height"], resized["original_width"], resized["original_height"]) == (300, 200, 900, 600)
    kept = ingest.validate_record(record, 10**7, True)
    assert (kept["width"], kept["height"], kept["original_width"], kept["original_height"]) == (900, 600, 900, 600)
    assert kept["content_digest"] != resized["content_digest"]  # what later stages read changed


def test_max_image_side_is_part_of_the_cache_key(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("{}\n")
    keys = {ingest.ingest_key(make_cfg(str(tmp_path), manifest, max_image_side=side), [str(manifest)], "jsonl")
            for side in (0, 256, 512)}
    assert len(keys) == 3


def test_older_pairs_tables_gain_the_original_size():
    old_schema = pa.schema([f for f in tables.PAIRS if f.name not in tables.ORIGINAL_SIZE])
    old = pa.Table.from_pylist([{"id": "a", "image": b"x", "width": 30, "height": 20, "text_raw": "t", "text": "t",
                                 "source": "m:1"}], schema=old_schema)
    upgraded = tables.upgrade_pairs(old)
    assert upgraded.schema.equals(tables.PAIRS)
    assert upgraded.select(["original_width", "original_height"]).to_pylist() == [
        {"original_width": 30, "original_height": 20}]
    assert tables.upgrade_pairs(upgraded) is upgraded
    with pytest.raises(ValueError, match="original_width"):
        tables.upgrade_pairs(old.drop_columns(["width"]))


def _validated(rows: list[tuple]) -> pa.Table:
    """(id, source, position, reason) rows as a VALIDATED table."""
    table = {name: [None] * len(rows) for name in ingest.VALIDATED.names}
    for i, (record_id, source, position, reason) in enumerate(rows):
        table["id"][i], table["source"][i], table["position"][i], table["reason"][i] = record_id, source, position, reason
        table["image"][i], table["text_raw"][i], table["text"][i] = (b"x", "t", "t") if reason is None else (None, None, None)
    return pa.Table.from_pydict(table, schema=ingest.VALIDATED)


def test_duplicates_keep_the_first_by_file_and_row():
    """Per id, the first valid occurrence by (file, row) is kept; invalid rows never count."""
    f2 = 2 << 40
    batch = _validated([
        ("a", "m.jsonl:10", 10, None), ("b", "m.jsonl:2", 2, None), ("a", "m.jsonl:9", 9, None),
        ("a", "m.jsonl:100", 100, None), ("c", "m.jsonl:1", 1, "missing_file"), ("c", "n.jsonl:1", f2 | 1, None),
        ("d", "n.jsonl:5", f2 | 5, None), ("d", "m.jsonl:50", 50, None),
    ])
    index = ingest.index_duplicates(lambda: [batch.slice(0, 3), batch.slice(3)])  # any block boundaries
    assert sorted(zip(index["id"].to_pylist(), index["first_source"].to_pylist())) == [
        ("a", "m.jsonl:9"), ("d", "m.jsonl:50")]
    assert sorted(index["first_position"].to_pylist()) == [9, 50]
    dups = ingest.duplicate_rows(batch, index).to_pylist()
    assert sorted((d["source"], d["reason"], d["detail"]) for d in dups) == [
        ("m.jsonl:10", "duplicate_id", "id 'a' already used by m.jsonl:9"),
        ("m.jsonl:100", "duplicate_id", "id 'a' already used by m.jsonl:9"),
        ("n.jsonl:5", "duplicate_id", "id 'd' already used by m.jsonl:50"),
    ]
    pairs = ingest.pairs_only(batch, index)
    assert sorted(pairs["source"].to_pylist()) == ["m.jsonl:2", "m.jsonl:50", "m.jsonl:9", "n.jsonl:1"]
    assert pairs.schema.equals(tables.PAIRS)
    assert ingest.pairs_only(batch, ingest.INDEX_SCHEMA.empty_table()).num_rows == 7
    assert ingest.index_duplicates(lambda: [batch.slice(1, 1)]).num_rows == 0


def test_tally_counts_reasons_and_conversions():
    batch = _validated([("a", "m:1", 1, None), ("b", "m:2", 2, "missing_file"), ("c", "m:3", 3, None)])
    batch = batch.set_column(batch.schema.get_field_index("converted_from"), "converted_from", pa.array(["L", None, None]))
    rows = sorted(ingest.tally(batch).to_pylist(), key=lambda r: (r["reason"], r["converted"]))
    assert rows == [{"reason": "", "converted": "", "n": 1}, {"reason": "", "converted": "L", "n": 1},
                    {"reason": "missing_file", "converted": "", "n": 1}]


def test_detect_format():
    assert detect_format("m", ["/d/m.jsonl"]) == "jsonl"
    assert detect_format("m", ["/d/m.csv"]) == "csv"
    assert detect_format("d", ["/d/a.tar", "/d/b.tar"]) == "webdataset"
    assert detect_format("d", ["/d/1.jpg", "/d/1.txt"]) == "tumemo"
    assert detect_format("d", ["/d/m.csv"], "parquet") == "parquet"
    with pytest.raises(IngestError, match="cannot tell the format"):
        detect_format("d", ["/d/a.bin"])


# --------------------------------------------------------------------------- Ray Data runs


@pytest.fixture()
def bad_jsonl(tmp_path):
    """A JSONL manifest with 5 good rows (2 converted) and one record per quarantine reason."""
    images = tmp_path / "images"
    images.mkdir()
    files = {
        "good0.jpg": encode("RGB", fmt="JPEG"), "good1.png": encode("RGB"), "good2.png": encode("RGB"),
        "cmyk.jpg": encode("CMYK", fmt="JPEG"), "gray.png": encode("L"),
        "empty.jpg": b"", "corrupt.jpg": b"garbage bytes", "trunc.jpg": encode("RGB", (64, 64), "JPEG")[:300],
        "bomb.png": encode("RGB", (120, 120)),
    }
    for name, data in files.items():
        (images / name).write_bytes(data)
    (images / "adir.jpg").mkdir()
    rows = [
        {"id": "g0", "image": "images/good0.jpg", "text": "Happy day @ann https://x.co #SunnyDay", "planted_partition": 1},
        {"id": "g1", "image": str(images / "good1.png"), "text": "I can't wait", "anps": ["happy dog", "sunny beach"]},
        {"id": "g2", "image": "images/good2.png", "text": "fine", "factual_score": 0.3, "emotional_score": 0.5},
        {"id": "c1", "image": "images/cmyk.jpg", "text": "cmyk"},
        {"id": "c2", "image": "images/gray.png", "text": "gray"},
        {"id": "g0", "image": "images/good1.png", "text": "same id again"},  # duplicate_id
        {"id": "m1", "image": "images/nope.jpg", "text": "missing"},  # missing_file
        {"id": "u1", "image": "images/adir.jpg", "text": "a directory"},  # unreadable_file
        {"id": "z1", "image": "images/empty.jpg", "text": "empty"},  # zero_size_image
        {"id": "k1", "image": "images/corrupt.jpg", "text": "corrupt"},  # corrupt_image
        {"id": "t1", "image": "images/trunc.jpg", "text": "truncated"},  # truncated_image
        {"id": "b1", "image": "images/bomb.png", "text": "bomb"},  # decompression_bomb
        {"id": "e1", "image": "images/good0.jpg", "text": "   "},  # empty_text
        {"id": "f1", "text": "no image"},  # missing_field
        {"id": "v1", "image": "images/good0.jpg", "text": "bad score", "factual_score": "high"},  # bad_value
        {"id": "w1", "image": "images/good0.jpg", "text": 7},  # wrong_type
    ]
    manifest = tmp_path / "manifest.jsonl"
    lines = [json.dumps(r).encode() for r in rows]
    lines.append(b'{"id": "d1", "image": "images/good0.jpg", "text": "caf\xe9"}')  # undecodable_text
    lines.append(b'{"id": "x1", "image": "images/good0.jpg", "te')  # malformed_record (cut off)
    manifest.write_bytes(b"\n".join(lines))
    return manifest


def test_jsonl_every_reason_and_cache(ray_local, bad_jsonl, output_dir, capsys):
    cfg = make_cfg(output_dir, bad_jsonl, max_image_pixels=10_000)
    out = run_ingest(cfg)
    assert out.stage == "ingest" and not out.cached
    expected = {r: 1 for r in tables.QUARANTINE_REASONS}
    assert reasons(out) == expected
    printed = capsys.readouterr().out
    assert "18 records -> 5 pairs, 13 quarantined" in printed and "duplicate_id=1" in printed

    quarantine = read_quarantine(out)
    assert quarantine.schema.equals(tables.QUARANTINE, check_metadata=False)
    by_reason = {r["reason"]: r for r in quarantine.to_pylist()}
    assert by_reason["missing_file"]["source"] == f"{bad_jsonl}:7"
    assert by_reason["duplicate_id"]["source"] == f"{bad_jsonl}:6"
    assert f"{bad_jsonl}:1" in by_reason["duplicate_id"]["detail"]
    assert by_reason["bad_value"]["field"] == "factual_score"
    assert (by_reason["wrong_type"]["source"], by_reason["wrong_type"]["field"]) == (f"{bad_jsonl}:16", "text")
    assert (by_reason["undecodable_text"]["source"], by_reason["undecodable_text"]["field"]) == (f"{bad_jsonl}:17", "text")
    assert by_reason["malformed_record"]["source"] == f"{bad_jsonl}:18"

    pairs = read_pairs_table(out)
    assert pairs.schema.names == tables.PAIRS.names
    rows = {r["id"]: r for r in pairs.to_pylist()}
    assert sorted(rows) == ["c1", "c2", "g0", "g1", "g2"]
    assert rows["g0"]["text"] == "Happy day Sunny Day"
    assert rows["g0"]["text_raw"] == "Happy day @ann https://x.co #SunnyDay"
    assert rows["g0"]["planted_partition"] == 1 and rows["g1"]["planted_partition"] is None
    assert rows["g1"]["text"] == "I cannot wait" and rows["g1"]["anps"] == "happy dog; sunny beach"
    assert rows["g2"]["factual_score"] == pytest.approx(0.3) and rows["g2"]["emotional_score"] == pytest.approx(0.5)
    assert (rows["c1"]["converted_from"], rows["c2"]["converted_from"], rows["g0"]["converted_from"]) == ("CMYK", "L", None)
    assert Image.open(io.BytesIO(rows["c1"]["image"])).mode == "RGB"
    summary = cache.read_summary(out.uri)
    assert summary["pairs"] == 5 and summary["quarantine_reasons"]["missing_file"] == 1
    assert summary["converted_to_rgb"] == {"CMYK": 1, "L": 1}

    again = run_ingest(cfg)
    assert again.cached and again.uri == out.uri
    changed = run_ingest(make_cfg(output_dir, bad_jsonl, max_image_pixels=10**8))
    assert not changed.cached and changed.key != out.key
    assert "decompression_bomb" not in reasons(changed)


def test_csv_and_parquet_manifests(ray_local, tmp_path, output_dir, monkeypatch):
    from console_capture import quiet

    stderr = quiet(monkeypatch)  # no progress line falls due: none printed
    (tmp_path / "a.png").write_bytes(encode("RGB"))
    (tmp_path / "b.png").write_bytes(encode("P"))
    csv = tmp_path / "m.csv"
    csv.write_bytes(
        b"image,text,label\n"
        b"a.png,first post,joy\n"
        b"b.png,second post,sad\n"
        b"a.png,caf\xe9 \xff broken,joy\n"  # undecodable_text
        b"a.png,first post,joy\n"  # identical row -> same content id -> duplicate_id
    )
    out = run_ingest(make_cfg(output_dir, csv))
    assert reasons(out) == {"undecodable_text": 1, "duplicate_id": 1}
    rows = read_pairs_table(out).to_pylist()
    assert [(r["text"], r["label"]) for r in sorted(rows, key=lambda r: r["text"])] == [
        ("first post", "joy"), ("second post", "sad")]
    assert {r["converted_from"] for r in rows} == {None, "P"}
    by_reason = {r["reason"]: r for r in read_quarantine(out).to_pylist()}
    assert by_reason["undecodable_text"]["source"] == f"{csv}:3"
    assert by_reason["duplicate_id"]["detail"].endswith(f"already used by {csv}:1")

    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": [1, 2], "image": ["a.png", "b.png"], "text": ["x", "y"]}), parquet)
    out = run_ingest(make_cfg(output_dir, parquet))
    assert sorted(read_pairs_table(out).column("id").to_pylist()) == ["1", "2"]
    assert read_quarantine(out).num_rows == 0
    assert stderr.lines("[ingest]") == []


def test_ingest_says_which_step_still_runs(ray_local, tmp_path, output_dir, monkeypatch):
    """A slow step (a fake that returns only once the heartbeat has named it) gets a line saying
    what runs, for how long, and how many records are validated."""
    from console_capture import heartbeat

    stderr = heartbeat(monkeypatch)
    (tmp_path / "a.png").write_bytes(encode("RGB"))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"id": str(i), "image": "a.png", "text": f"post {i}"}) for i in range(3)))
    find_duplicates = ingest.find_duplicates

    def slow_find_duplicates(validated):
        stderr.wait_for("[ingest] still running: finding duplicate ids, ")
        return find_duplicates(validated)

    monkeypatch.setattr(ingest, "find_duplicates", slow_find_duplicates)
    out = run_ingest(make_cfg(output_dir, manifest))
    assert read_pairs_table(out).num_rows == 3
    heartbeats = stderr.lines("[ingest] still running: ")
    assert heartbeats[0].startswith("[ingest] still running: reading and validating the records of 1 input file(s), ")
    assert any(line.startswith("[ingest] still running: finding duplicate ids, ") and
               line.endswith(" s; 3 records validated") for line in heartbeats)


def test_ingest_stores_images_resized_with_their_original_size(ray_local, tmp_path, output_dir):
    (tmp_path / "big.jpg").write_bytes(encode("RGB", (1000, 400), "JPEG"))
    (tmp_path / "small.png").write_bytes(encode("RGBA", (40, 30)))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "image": f"{i}.{ext}", "text": f"post {i}"}) + "\n"
                                for i, ext in (("big", "jpg"), ("small", "png"))))
    out = run_ingest(make_cfg(output_dir, manifest, max_image_side=250))
    table = read_pairs_table(out)
    assert table.schema.equals(tables.PAIRS)
    rows = {r["id"]: r for r in table.to_pylist()}
    big, small = rows["big"], rows["small"]
    assert (big["width"], big["height"], big["original_width"], big["original_height"]) == (250, 100, 1000, 400)
    assert Image.open(io.BytesIO(big["image"])).size == (250, 100)
    assert (small["width"], small["height"], small["original_width"], small["original_height"]) == (40, 30, 40, 30)
    assert Image.open(io.BytesIO(small["image"])).format == "PNG" and small["converted_from"] == "RGBA"


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(ray_local, tmp_path, output_dir):
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        _add(tar, "000000001.jpg", encode("RGB", fmt="JPEG"))
        _add(tar, "000000001.txt", b"a caption #Fun")
        _add(tar, "000000001.json", json.dumps({"caption": "ignored, txt wins", "url": "http://x"}).encode())
        _add(tar, "000000002.png", encode("LA"))
        _add(tar, "000000002.json", json.dumps({"caption": "from json"}).encode())
        _add(tar, "000000003.txt", b"no image here")  # missing_field
    with tarfile.open(shards / "00001.tar", "w") as tar:
        _add(tar, "000000004.jpg", encode("RGB", fmt="JPEG")[:200])  # truncated
        _add(tar, "000000004.txt", b"cut")
        _add(tar, "000000005.jpg", encode("RGB", fmt="JPEG"))
        _add(tar, "000000005.txt", b"\xff\xfe\xfa")  # undecodable_text
    out = run_ingest(make_cfg(output_dir, shards))
    assert reasons(out) == {"missing_field": 1, "truncated_image": 1, "undecodable_text": 1}
    rows = {r["id"]: r for r in read_pairs_table(out).to_pylist()}
    assert rows["000000001"]["text"] == "a caption Fun"
    assert rows["000000002"]["text"] == "from json" and rows["000000002"]["converted_from"] == "LA"
    assert rows["000000001"]["source"].endswith("00000.tar#000000001")


def test_tumemo_layouts(ray_local, tmp_path, output_dir):
    per_id = tmp_path / "tumemo_txt"
    (per_id / "image").mkdir(parents=True)
    (per_id / "text").mkdir()
    for i in range(3):
        (per_id / "image" / f"{i}.jpg").write_bytes(encode("RGB", fmt="JPEG"))
    for i in (0, 1, 7):  # 7 has no image; 2 has no text
        (per_id / "text" / f"{i}.txt").write_text(f"post {i} :)")
    out = run_ingest(make_cfg(output_dir, per_id))
    assert sorted(read_pairs_table(out).column("id").to_pylist()) == ["0", "1"]
    assert reasons(out) == {"missing_file": 1, "missing_field": 1}

    listed = tmp_path / "tumemo_json"
    listed.mkdir()
    for i in range(2):
        (listed / f"{i}.jpg").write_bytes(encode("RGB", fmt="JPEG"))
    entries = [{"id": "0", "text": "love it", "emotion_label": "Happy"},
               {"id": "1", "text": "", "emotion_label": "Sad"}]
    (listed / "all.json").write_text(json.dumps(entries))
    out = run_ingest(make_cfg(output_dir, listed))
    rows = read_pairs_table(out).to_pylist()
    assert [(r["id"], r["label"]) for r in rows] == [("0", "Happy")]
    assert reasons(out) == {"empty_text": 1}


def test_all_bad_raises_with_summary(ray_local, tmp_path, output_dir):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text(json.dumps({"image": "missing.jpg", "text": "x"}) + "\n"
                        + json.dumps({"image": "missing2.jpg", "text": " "}) + "\n")
    with pytest.raises(IngestError, match="every record") as info:
        run_ingest(make_cfg(output_dir, manifest))
    assert info.value.summary["quarantine_reasons"] == {"missing_file": 1, "empty_text": 1}
    assert "missing_file=1" in str(info.value)


# --------------------------------------------------------------------------- every fault, every format

# Each format's manifest holds: ids "01", "1", "007" (kept verbatim and distinct) on an RGB JPEG, a
# phone JPEG stored 40x20 with EXIF Orientation 6 and a 16-bit grayscale PNG ramp; then one record
# that is bad in that format's own way. Expected: exactly those three pairs, the pixels as seen,
# and the bad record quarantined with its reason and row.


def phone_jpeg() -> bytes:
    """Stored 40x20, left half red, right half blue; Orientation 6 -> displayed 20x40, red on top."""
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20], array[:, 20:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", exif=exif.tobytes(), quality=100, subsampling=0)
    return buffer.getvalue()


def ramp_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(1, 256).repeat(2, 0)).save(buffer, "PNG")
    return buffer.getvalue()


IMAGES = {"01": ("plain.jpg", lambda: encode("RGB", (30, 20), "JPEG")), "1": ("phone.jpg", phone_jpeg), "007": ("deep.png", ramp_png)}
TEXTS = {"01": "plain picture", "1": "phone picture", "007": "deep picture"}


def _write_images(folder) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for record_id, (name, make) in IMAGES.items():
        (folder / name).write_bytes(make())
        out[record_id] = name
    return out


def _jsonl(tmp_path):
    names = _write_images(tmp_path)
    lines = [json.dumps({"id": i, "image": names[i], "text": TEXTS[i]}).encode() for i in IMAGES]
    lines.append(b'{"id": "bad", "image": "plain.jpg", "text": "caf\xe9"}')
    lines.append(b'{"id": "cut", "image": "plain.jpg", "text": "writer kil')
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines))
    return tmp_path / "m.jsonl", [("undecodable_text", "text", ":4"), ("malformed_record", "record", ":5")]


def _csv(tmp_path):
    names = _write_images(tmp_path)
    lines = [b"id,image,text"] + [f'{i},{names[i]},"{TEXTS[i]}"'.encode() for i in IMAGES]
    lines.append(b'bad,plain.jpg,"caf\xe9"')
    lines.append(b'cut,plain.jpg,"writer kil')
    (tmp_path / "m.csv").write_bytes(b"\r\n".join(lines))
    return tmp_path / "m.csv", [("undecodable_text", "text", ":4"), ("malformed_record", "record", ":5")]


def _parquet(image_column):
    def make(tmp_path):
        names = _write_images(tmp_path / "img")
        data = {i: (tmp_path / "img" / names[i]).read_bytes() for i in IMAGES}
        ids = list(IMAGES) + ["bad", "typed"]
        images = image_column(names, data, ids)
        texts = [TEXTS[i].encode() for i in IMAGES] + [b"caf\xe9", b"fine"]
        scores = [None, None, None, None, "high"]
        pq.write_table(pa.table({"id": ids, "image": images, "text": pa.array(texts, pa.binary()),
                                 "factual_score": pa.array(scores, pa.string())}), tmp_path / "m.parquet")
        return tmp_path / "m.parquet", [("undecodable_text", "text", ":4"), ("bad_value", "factual_score", ":5")]
    return make


def _paths(names, data, ids):
    return pa.array([f"img/{names.get(i, names['01'])}" for i in ids], pa.string())


def _binary(names, data, ids):
    return pa.array([data.get(i, data["01"]) for i in ids], pa.binary())


def _hf_struct(names, data, ids):
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.array([{"bytes": data.get(i, data["01"]), "path": names.get(i, "x.jpg")} for i in ids], kind)


def _webdataset(tmp_path):
    names = _write_images(tmp_path / "src")
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for i in IMAGES:
            suffix = names[i].rsplit(".", 1)[1]
            _add(tar, f"{i}.{suffix}", (tmp_path / "src" / names[i]).read_bytes())
            _add(tar, f"{i}.txt", TEXTS[i].encode())
        _add(tar, "bad.jpg", (tmp_path / "src" / names["01"]).read_bytes())
        _add(tar, "bad.txt", b"caf\xe9")
        _add(tar, "cut.jpg", (tmp_path / "src" / names["01"]).read_bytes())
    data = (shards / "00000.tar").read_bytes()
    cut = data.rindex(b"cut.jpg")  # header of the last member; keep 100 bytes of its data
    (shards / "00000.tar").write_bytes(data[: cut + 512 + 100])
    return shards, [("undecodable_text", "text", "#bad"), ("malformed_record", "cut.jpg", "#cut")]


def _tumemo(tmp_path):
    root = tmp_path / "tumemo"
    names = _write_images(root / "image")
    for i in IMAGES:  # TumEmo names images by id
        (root / "image" / names[i]).rename(root / "image" / f"{i}.{names[i].rsplit('.', 1)[1]}")
    (root / "text").mkdir()
    for i in IMAGES:
        (root / "text" / f"{i}.txt").write_text(TEXTS[i])
    (root / "text" / "bad.txt").write_bytes(b"caf\xe9")
    (root / "image" / "bad.jpg").write_bytes(encode("RGB", fmt="JPEG"))
    (root / "text" / "lost.txt").write_text("no image for me")
    (root / "image" / "._01.jpg").write_bytes(b"macOS resource fork")  # ignored
    return root, [("undecodable_text", "text", "bad.txt"), ("missing_file", "image", "lost.txt")]


FORMAT_CASES = {
    "jsonl": _jsonl, "csv": _csv, "parquet-paths": _parquet(_paths), "parquet-inline-binary": _parquet(_binary),
    "parquet-hf-image-struct": _parquet(_hf_struct), "webdataset": _webdataset, "tumemo": _tumemo,
}


@pytest.mark.parametrize("name", list(FORMAT_CASES))
def test_every_fault_in_every_format(ray_local, tmp_path, output_dir, name):
    manifest, bad = FORMAT_CASES[name](tmp_path)
    out = run_ingest(make_cfg(output_dir, manifest))
    pairs = {r["id"]: r for r in read_pairs_table(out).to_pylist()}
    assert sorted(pairs) == ["007", "01", "1"]  # verbatim, distinct
    assert {i: pairs[i]["text"] for i in pairs} == TEXTS

    phone = pairs["1"]
    assert (phone["width"], phone["height"]) == (20, 40)
    upright = np.asarray(Image.open(io.BytesIO(phone["image"])).convert("RGB"), np.int16)
    assert upright.shape == (40, 20, 3)
    assert np.abs(upright[5, 10] - (255, 0, 0)).max() < 10 and np.abs(upright[34, 10] - (0, 0, 255)).max() < 10

    deep = pairs["007"]
    assert deep["converted_from"] == "I;16"
    ramp = np.asarray(Image.open(io.BytesIO(deep["image"])).convert("RGB"))[0, :, 0]
    assert ramp.tolist() == list(range(256))

    quarantine = sorted((q["reason"], q["field"], q["source"]) for q in read_quarantine(out).to_pylist())
    assert [(r, f) for r, f, _ in quarantine] == sorted((r, f) for r, f, _ in bad)
    for (reason, _, source), (_, _, suffix) in zip(quarantine, sorted(bad)):
        assert source.endswith(suffix), (reason, source, suffix)
    assert cache.read_summary(out.uri)["pairs"] == 3


def test_big_rfc4180_csv_reads_every_row(ray_local, tmp_path, output_dir):
    """Over 1 MiB, quoted newlines and commas in every text (pyarrow's block reader fails here)."""
    import csv

    (tmp_path / "a.png").write_bytes(encode("RGB", (8, 8)))
    texts = [f"post {i}, with a comma\nand a newline {'y' * 420}" for i in range(2500)]
    with open(tmp_path / "big.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image", "text"])
        writer.writerows([f"{i:04d}", "a.png", t] for i, t in enumerate(texts))
    assert (tmp_path / "big.csv").stat().st_size > 2**20
    out = run_ingest(make_cfg(output_dir, tmp_path / "big.csv", clean_text=False))
    pairs = read_pairs_table(out, columns=["id", "text_raw"]).to_pylist()
    assert len(pairs) == 2500 and read_quarantine(out).num_rows == 0
    assert {p["id"]: p["text_raw"] for p in pairs}["0042"] == texts[42]


def test_duplicates_across_files_keep_the_first_file(ray_local, tmp_path, output_dir):
    (tmp_path / "a.png").write_bytes(encode("RGB"))
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"id": "x", "image": "../a.png", "text": "first"}) + "\n")
    (folder / "b.jsonl").write_text(json.dumps({"id": "y", "image": "../a.png", "text": "other"}) + "\n"
                                    + json.dumps({"id": "x", "image": "../a.png", "text": "second"}) + "\n")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # ignored
    out = run_ingest(make_cfg(output_dir, folder))
    pairs = {r["id"]: r["text"] for r in read_pairs_table(out).to_pylist()}
    assert pairs == {"x": "first", "y": "other"}
    (dup,) = read_quarantine(out).to_pylist()
    assert dup["source"] == f"{folder / 'b.jsonl'}:2" and dup["detail"] == f"id 'x' already used by {folder / 'a.jsonl'}:1"
