"""WebDataset-style tar shards for reader tests (imported by test modules; ``tests/`` is on
``sys.path`` through the root conftest)."""

from __future__ import annotations

import io
import tarfile


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar holding ``(name, data)`` members in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_file(path, members: list[tuple[str, bytes]]) -> str:
    """:func:`tar_bytes` written to ``path``; returns it as a string."""
    path.write_bytes(tar_bytes(members))
    return str(path)
