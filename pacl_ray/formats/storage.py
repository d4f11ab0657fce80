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


# --------------------------------------------------------------------------- Parquet directories


def read_parquet_dir(uri: str, columns: list[str] | None = None, filter_expr=None) -> pa.Table:
    """Every Parquet file below a directory as one table (column projection and row filter pushed
    down to the files)."""
    import pyarrow.dataset as pads

    fs, path = resolve(uri)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns, filter=filter_expr)


def write_parquet(table: pa.Table, directory: str, name: str = "part-00000.parquet") -> None:
    """Write ``table`` as one Parquet file ``name`` in ``directory`` (created if missing)."""
    import pyarrow.parquet as pq

    makedirs(directory)
    fs, path = resolve(join(directory, name))
    pq.write_table(table, path, filesystem=fs)


def parquet_rows(uri: str) -> int:
    """Rows of every Parquet file below a directory, from the file footers (no data read)."""
    import pyarrow.parquet as pq

    total = 0
    for file_uri in list_files(uri, ".parquet"):
        fs, path = resolve(file_uri)
        with fs.open_input_file(path) as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total
