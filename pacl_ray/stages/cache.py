"""Content-keyed stage outputs: a stage whose inputs and config did not change is not re-run.

A stage's directory is ``{output_dir}/stages/{stage}/{key}`` where ``key`` hashes the config
fields the stage depends on and the keys of its upstream stages. A directory is complete when it
holds a ``_SUCCESS`` marker, written last, so an interrupted stage is simply re-run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pacl_ray.formats import storage

SUCCESS = "_SUCCESS"


@dataclass(frozen=True)
class StageOutput:
    """Where a finished stage wrote its tables, and whether it was taken from the cache."""

    stage: str
    key: str
    uri: str
    cached: bool

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)


def _jsonable(obj: Any) -> Any:
    # An upstream stage is identified by its content key, never by where it was written.
    if isinstance(obj, StageOutput):
        return {"stage": obj.stage, "key": obj.key}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return str(obj)


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (dataclasses and StageOutputs allowed)."""
    blob = json.dumps(parts, sort_keys=True, default=_jsonable)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def file_fingerprint(uri: str) -> list:
    """Identify input files by path, size and modification time (cheap; no content read)."""
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type.name == "Directory":
        return [file_fingerprint(f) for f in storage.list_files(uri)]
    if info.type.name == "NotFound":
        raise FileNotFoundError(f"input not found: {uri}")
    return [storage.normalize(uri), info.size, info.mtime_ns]


def stage_uri(output_dir: str, stage: str, key: str) -> str:
    return storage.join(output_dir, "stages", stage, key)


def is_complete(uri: str) -> bool:
    return storage.exists(storage.join(uri, SUCCESS))


def mark_complete(uri: str, summary: dict | None = None) -> None:
    """Write the completion marker (with an optional JSON summary) after all outputs exist."""
    storage.write_text(storage.join(uri, SUCCESS), json.dumps(summary or {}, indent=2, default=str))


def read_summary(uri: str) -> dict:
    return json.loads(storage.read_text(storage.join(uri, SUCCESS)) or "{}")
