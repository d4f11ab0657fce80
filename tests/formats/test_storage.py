"""pacl_ray.formats.storage and pacl_ray.stages.cache through local paths, file:// URIs and a mock S3 (moto on
loopback), since cluster runs keep stage outputs and checkpoints on object storage."""

from __future__ import annotations

import socket

import pytest

from pacl_ray.stages import cache
from pacl_ray.formats import storage


def _roundtrip(root: str) -> None:
    target = storage.join(root, "a", "b.txt")
    storage.write_text(target, "hello")
    assert storage.exists(target)
    assert storage.read_text(target) == "hello"
    storage.write_bytes(storage.join(root, "a", "c", "d.bin"), b"\x00\x01")
    files = storage.list_files(storage.join(root, "a"))
    assert files == [storage.join(root, "a", "b.txt"), storage.join(root, "a", "c", "d.bin")]
    assert storage.list_files(storage.join(root, "a"), suffix=".bin") == [storage.join(root, "a", "c", "d.bin")]
    storage.delete_dir(storage.join(root, "a"))
    assert not storage.exists(target)


def test_local_and_file_uri(tmp_path):
    _roundtrip(str(tmp_path / "local"))
    _roundtrip(f"file://{tmp_path}/viauri")


def test_normalize_and_join():
    assert storage.join("s3://bucket/x", "y", "z") == "s3://bucket/x/y/z"
    assert storage.normalize("~/x").startswith("/")
    assert storage.is_remote("s3://b/k") and not storage.is_remote("file:///tmp") and not storage.is_remote("/tmp")


def test_content_key_is_stable_and_sensitive():
    a = cache.content_key({"x": 1, "y": [1, 2]}, "s")
    assert a == cache.content_key({"y": [1, 2], "x": 1}, "s")
    assert a != cache.content_key({"x": 2, "y": [1, 2]}, "s")
    upstream = cache.StageOutput("ingest", "abc", "/tmp/x", cached=False)
    moved = cache.StageOutput("ingest", "abc", "/elsewhere", cached=True)
    assert cache.content_key(upstream) == cache.content_key(moved)  # keyed by content, not place


def test_stage_completion_marker(tmp_path):
    uri = cache.stage_uri(str(tmp_path), "ingest", "k1")
    assert not cache.is_complete(uri)
    cache.mark_complete(uri, {"rows": 3})
    assert cache.is_complete(uri) and cache.read_summary(uri) == {"rows": 3}


def test_file_fingerprint_changes_with_content(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("a\n")
    first = cache.file_fingerprint(str(path))
    path.write_text("ab\n")
    assert cache.file_fingerprint(str(path)) != first
    with pytest.raises(FileNotFoundError, match="not found"):
        cache.file_fingerprint(str(tmp_path / "missing"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def mock_s3(monkeypatch):
    """A moto S3 server on 127.0.0.1 with bucket ``pacl``; pyarrow reaches it via env variables."""
    pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="pacl")
    yield endpoint
    server.stop()


def test_s3_roundtrip_through_pyarrow(mock_s3):
    root = f"s3://pacl/runs?endpoint_override={mock_s3.split('://')[1]}&scheme=http"
    fs, path = storage.resolve(root)
    assert type(fs).__name__ == "S3FileSystem" and path == "pacl/runs"
    # Stage outputs and markers written to S3 are read back by the same helpers.
    base = "s3://pacl/runs"
    storage.write_text(base + "/x/config.yaml", "a: 1\n")
    assert storage.read_text(base + "/x/config.yaml") == "a: 1\n"
    uri = cache.stage_uri(base, "partition", "k")
    cache.mark_complete(uri, {"ok": True})
    assert cache.is_complete(uri)


def test_redact_hides_credentials_in_uris():
    assert storage.redact("s3://AKIA:SECRET@bucket/runs/x") == "s3://***@bucket/runs/x"
    assert storage.redact("gs://b/p?access_key=A&region=eu&secret_key=S") == "gs://b/p?access_key=***&region=eu&secret_key=***"
    assert storage.redact("s3://bucket/runs?endpoint_override=localhost:9000&scheme=http") == \
        "s3://bucket/runs?endpoint_override=localhost:9000&scheme=http"
    assert storage.redact("/home/me/runs@v2") == "/home/me/runs@v2" and storage.redact("file:///tmp/r") == "file:///tmp/r"


def test_stage_on_s3_publishes_a_record_and_detects_damage(mock_s3):
    """S3 has no atomic rename: the record at {key}/_SUCCESS names the staging directory, and
    damage to a file is still caught by size (at lookup) and checksum (when read)."""
    import pyarrow as pa

    base, calls = "s3://pacl/runs", []

    def build(uri: str) -> dict:
        calls.append(uri)
        storage.write_parquet(pa.table({"id": ["a", "b"], "x": [1, 2]}), storage.join(uri, "t"))
        return {"rows": 2}

    out = cache.run_cached(base, "t", "k", build)
    assert out.uri.startswith("s3://pacl/runs/stages/t/.k.") and out.files is not None
    found = cache.lookup(base, "t", "k")
    assert found is not None and found.uri == out.uri and cache.read_summary(found.uri) == {"rows": 2}
    assert cache.read_table(found, "t").column("x").to_pylist() == [1, 2]
    assert cache.run_cached(base, "t", "k", build).cached and len(calls) == 1

    part = found.path("t", "part-00000.parquet")
    data = bytearray(storage.read_bytes(part))
    data[len(data) // 2] ^= 0x01
    storage.write_bytes(part, bytes(data))
    with pytest.raises(cache.StageDataError, match="part-00000.parquet: content differs"):
        cache.read_table(found, "t")
    assert cache.lookup(base, "t", "k") is None  # invalidated: the next run redoes the stage
    again = cache.run_cached(base, "t", "k", build)
    assert not again.cached and again.uri != out.uri and len(calls) == 2

    storage.write_bytes(again.path("t", "part-00000.parquet"), b"PAR1")  # truncated
    assert cache.lookup(base, "t", "k") is None
