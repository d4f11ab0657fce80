"""Paths and URIs through pyarrow filesystems: local paths, ``file://``, ``s3://``, ``gs://``.

Stage outputs and checkpoints go through these helpers so a run behaves the same on a laptop and
on a cluster whose nodes only share object storage.
"""

from __future__ import annotations

import os
import posixpath

import pyarrow as pa
import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than ``file``."""
    return "://" in uri and not uri.startswith("file://")


def normalize(uri: str) -> str:
    """Expand ``~`` and make local paths absolute; URIs are returned unchanged."""
    if "://" in uri:
        return uri.rstrip("/") if len(uri.split("://", 1)[1]) > 1 else uri
    return os.path.abspath(os.path.expanduser(uri))


_SECRET_QUERY_KEYS = ("key", "secret", "token", "password", "credential", "signature", "session")


def redact(uri: str) -> str:
    """``uri`` safe to write into configs, logs and metrics: the user-info part of a URI
    (``s3://KEY:SECRET@bucket/...``) becomes ``***@`` and query values whose name mentions a key,
    secret, token, password, credential, signature or session become ``***``. Local paths are
    returned unchanged."""
    if "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    authority, sep, tail = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    rest = authority + sep + tail
    if "?" in rest:
        path, query = rest.split("?", 1)
        params = []
        for item in query.split("&"):
            name, eq, _ = item.partition("=")
            secret = eq and any(word in name.lower() for word in _SECRET_QUERY_KEYS)
            params.append(f"{name}=***" if secret else item)
        rest = path + "?" + "&".join(params)
    return f"{scheme}://{rest}"


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and in-filesystem path for a local path or URI."""
    uri = normalize(uri)
    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    return pafs.FileSystem.from_uri(uri)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI."""
    uri = normalize(uri)
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.join(rest, *parts)}"
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically where the filesystem allows (local: write then rename)."""
    fs, path = resolve(uri)
    parent = posixpath.dirname(path) if "://" in normalize(uri) else os.path.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as handle:
        handle.write(data)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as handle:
        return handle.read()


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def delete_dir(uri: str) -> None:
    """Remove a directory tree if it exists."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files below a directory (recursive), as URIs of the same form as ``uri``, sorted."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    rels = sorted(
        posixpath.relpath(i.path, path)
        for i in infos
        if i.type == pafs.FileType.File and i.path.endswith(suffix)
    )
    return [join(uri, rel) for rel in rels]


def move_dir(src: str, dst: str) -> bool:
    """Rename directory ``src`` to ``dst`` when the filesystem has an atomic rename (local paths and
    ``file://``); False, doing nothing, on object stores (S3, GCS), which copy file by file.

    Raises OSError when ``dst`` exists and is not empty (the rename does not merge)."""
    fs, src_path = resolve(src)
    if not isinstance(fs, pafs.LocalFileSystem):
        return False
    _, dst_path = resolve(dst)
    os.rename(src_path, dst_path)  # atomic on POSIX; ENOTEMPTY/EEXIST when dst holds files
    return True


def file_sizes(uri: str) -> dict[str, int]:
    """{path relative to ``uri``: size in bytes} of every file below a directory (one listing)."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {posixpath.relpath(i.path, path): int(i.size) for i in infos if i.type == pafs.FileType.File}


def sha256_file(uri: str, chunk_bytes: int = 8 << 20) -> tuple[int, str]:
    """(size in bytes, hex SHA-256) of a file, streamed in chunks."""
    import hashlib

    fs, path = resolve(uri)
    digest, size = hashlib.sha256(), 0
    with fs.open_input_stream(path) as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


# --------------------------------------------------------------------------- Parquet directories


class FileCheckError(ValueError):
    """A file is missing, unreadable, or differs from its expected size or checksum.
    The message starts with the file's URI."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: {reason}")
        self.uri, self.reason = uri, reason


def _parquet_files(source: str | list[str]) -> list[str]:
    if isinstance(source, (list, tuple)):
        return list(source)
    if not exists(source):
        raise FileNotFoundError(f"{source} does not exist")
    return list_files(source, ".parquet")


def read_parquet_dir(
    source: str | list[str],
    columns: list[str] | None = None,
    filter_expr=None,
    expected: dict[str, tuple[int, str]] | None = None,
) -> pa.Table:
    """The one Parquet reader: every Parquet file below a directory (or the given file URIs, in
    order) as one table, with column projection and a row filter (a ``pyarrow.compute``
    expression) applied per file.

    ``expected`` maps a file's URI to its (size in bytes, hex SHA-256), e.g. from a stage's
    completion record: such a file is read whole, and its size and checksum are compared before
    it is parsed. Files not in ``expected`` are read with projection and no check.

    Raises:
        FileNotFoundError: ``source`` is a directory that does not exist.
        FileCheckError: a file differs from ``expected``, cannot be parsed as Parquet (e.g.
            truncated), or lacks a requested column; the message names the file (and column).
    """
    import hashlib

    import pyarrow.parquet as pq

    parts = []
    for uri in _parquet_files(source):
        fs, path = resolve(uri)
        want = (expected or {}).get(uri)
        try:
            if want is not None:
                with fs.open_input_stream(path) as handle:
                    data = handle.read()
                if len(data) != want[0]:
                    raise FileCheckError(uri, f"size {len(data)} bytes, expected {want[0]}")
                if want[1] and hashlib.sha256(data).hexdigest() != want[1]:
                    raise FileCheckError(uri, "content differs from its recorded SHA-256 (corrupted)")
                parquet = pq.ParquetFile(pa.BufferReader(data))
            else:
                parquet = pq.ParquetFile(fs.open_input_file(path))
            names = parquet.schema_arrow.names
            missing = [c for c in columns or [] if c not in names]
            if missing:
                raise FileCheckError(uri, f"missing column {missing[0]!r} (have {names})")
            table = parquet.read(columns=columns)
        except FileCheckError:
            raise
        except (pa.ArrowException, OSError) as err:
            raise FileCheckError(uri, f"not a readable Parquet file ({err})") from err
        parts.append(table.filter(filter_expr) if filter_expr is not None else table)
    if not parts:
        return pa.table({c: pa.array([], pa.null()) for c in columns or []})
    return pa.concat_tables(parts, promote_options="permissive")


def write_parquet(table: pa.Table, directory: str, name: str = "part-00000.parquet") -> None:
    """Write ``table`` as one Parquet file ``name`` in ``directory`` (created if missing)."""
    import pyarrow.parquet as pq

    makedirs(directory)
    fs, path = resolve(join(directory, name))
    pq.write_table(table, path, filesystem=fs)


def parquet_file_rows(uri: str) -> int:
    """Rows of one Parquet file, from its footer (no data read); FileCheckError if unreadable."""
    import pyarrow.parquet as pq

    fs, path = resolve(uri)
    try:
        with fs.open_input_file(path) as handle:
            return pq.ParquetFile(handle).metadata.num_rows
    except (pa.ArrowException, OSError) as err:
        raise FileCheckError(uri, f"not a readable Parquet file ({err})") from err


def parquet_rows(source: str | list[str]) -> int:
    """Rows of every Parquet file below a directory (or of the given files), from the footers."""
    return sum(parquet_file_rows(uri) for uri in _parquet_files(source))
