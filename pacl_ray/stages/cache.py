"""Content-keyed stage outputs: a stage whose inputs and config did not change is not re-run, and
a stage's directory never claims more than it holds.

Layout. A stage's output is ``{output_dir}/stages/{stage}/{key}``, where ``key`` hashes the config
fields the stage depends on and the keys of its upstream stages (:func:`content_key`).

Completion record. A stage is finished when ``{key}/_SUCCESS`` exists. It is written last and
lists every file of the stage with its size and SHA-256, next to the stage's summary::

    {"version": 2, "summary": {...}, "data": "", "files": {"scores/part-00000.parquet":
                                                             {"size": 1234, "sha256": "..."}}}

Publishing (:func:`run_cached`). A stage is built in a unique staging directory
``stages/{stage}/.{key}.{uuid}`` that no other run writes, its record is written there last, and
then it is published:

* local paths and ``file://``: one atomic ``rename`` of the staging directory to ``{key}``. Of two
  concurrent runs of one stage, one rename wins; the other finds a complete ``{key}``, verifies it
  and uses it, and deletes its own staging copy. ``{key}`` is never a mix of two runs.
* object stores (``s3://``, ``gs://``: no atomic rename): the files stay in the staging
  directory, and the record is also written (one atomic PUT) to ``{key}/_SUCCESS`` with ``data``
  naming that directory. Two concurrent runs each publish a self-consistent record; the last PUT
  wins, and the other run's files stay readable by whoever already resolved them.

Verification. On every cache lookup (:func:`lookup`) the files listed in the record are checked
for presence and size (one directory listing, no data read); a stage that fails is reported by
file name and redone. Readers of stage tables (:func:`read_table`) also compare each file's
SHA-256 before parsing it: they read whole Parquet files anyway, so hashing the bytes already in
memory costs little next to parsing them. A file that fails there raises :class:`StageDataError`
naming the file, and the record is renamed to ``_SUCCESS.invalid`` so the next run redoes the
stage (its files are kept for inspection). Ray Data pipelines that stream a table (scoring, embed,
training on big data) get the listed files and the size check only; hashing every image byte on
every run would cost as much as reading the data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import pyarrow as pa

from pacl_ray.formats import storage

SUCCESS = "_SUCCESS"
INVALID = "_SUCCESS.invalid"
RECORD_VERSION = 2
PUBLISH_ATTEMPTS = 5


class StageDataError(RuntimeError):
    """A finished stage's file is missing or differs from its completion record."""


@dataclass(frozen=True)
class StageOutput:
    """Where a finished stage wrote its tables, and whether it was taken from the cache.

    ``files`` maps each file (relative to ``uri``) to (size in bytes, hex SHA-256), from the
    completion record; None for hand-made outputs without a record (tests), which are read unchecked.
    """

    stage: str
    key: str
    uri: str
    cached: bool
    files: Optional[Mapping[str, tuple[int, str]]] = field(default=None, compare=False, repr=False)
    record_uri: str = field(default="", compare=False, repr=False)

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


# --------------------------------------------------------------------------- completion records


def _checksums(data_uri: str) -> dict[str, dict]:
    files = {}
    for rel in sorted(storage.file_sizes(data_uri)):
        if posixpath.basename(rel) in (SUCCESS, INVALID):
            continue
        size, digest = storage.sha256_file(storage.join(data_uri, rel))
        files[rel] = {"size": size, "sha256": digest}
    return files


def _record(summary: dict | None, data: str, files: dict) -> str:
    return json.dumps({"version": RECORD_VERSION, "summary": summary or {}, "data": data, "files": files},
                      indent=2, default=str)


def is_complete(uri: str) -> bool:
    return storage.exists(storage.join(uri, SUCCESS))


def mark_complete(uri: str, summary: dict | None = None) -> None:
    """Write the completion record of a directory written in place (after all its outputs
    exist): its summary and every file's size and SHA-256. Stages run through :func:`run_cached`
    never call this; it is for outputs that must be written in place (training's Ray Train
    directory, evaluation rows)."""
    storage.write_text(storage.join(uri, SUCCESS), _record(summary, "", _checksums(uri)))


def read_record(uri: str) -> dict:
    """The completion record of ``uri``; a pre-version-2 marker reads as a summary without files."""
    record = json.loads(storage.read_text(storage.join(uri, SUCCESS)) or "{}")
    if record.get("version") != RECORD_VERSION:
        return {"version": 1, "summary": record, "data": "", "files": None}
    return record


def read_summary(uri: str) -> dict:
    return read_record(uri)["summary"]


def _data_uri(uri: str, data: str) -> str:
    return storage.join(posixpath.dirname(storage.normalize(uri).rstrip("/")), data) if data else uri


def _expected(record: dict) -> Optional[dict[str, tuple[int, str]]]:
    files = record.get("files")
    return None if files is None else {rel: (int(e["size"]), e["sha256"]) for rel, e in files.items()}


def verify_sizes(data_uri: str, files: Mapping[str, tuple[int, str]]) -> list[str]:
    """Problems (one line each, naming the file) of a stage's files against its record sizes."""
    present = storage.file_sizes(data_uri)
    problems = []
    for rel, (size, _) in sorted(files.items()):
        if rel not in present:
            problems.append(f"{storage.join(data_uri, rel)}: missing")
        elif present[rel] != size:
            problems.append(f"{storage.join(data_uri, rel)}: size {present[rel]} bytes, recorded {size}")
    return problems


def lookup(output_dir: str, stage: str, key: str) -> Optional[StageOutput]:
    """The finished output of (stage, key), or None when there is none or its files do not match
    their record (sizes; reported on stdout with the file name, so the caller redoes the stage)."""
    uri = stage_uri(output_dir, stage, key)
    if not is_complete(uri):
        return None
    try:
        record = read_record(uri)
    except (OSError, ValueError) as err:
        print(f"{stage}: unreadable completion record {storage.join(uri, SUCCESS)} ({err}); redoing the stage")
        return None
    data_uri = _data_uri(uri, record.get("data", ""))
    expected = _expected(record)
    if expected is not None:
        problems = verify_sizes(data_uri, expected)
        if problems:
            print(f"{stage}: cached output {key} does not match its completion record; redoing the stage\n  "
                  + "\n  ".join(problems[:5]))
            return None
    return StageOutput(stage, key, data_uri, cached=True, files=expected, record_uri=storage.join(uri, SUCCESS))


def invalidate(output: StageOutput) -> None:
    """Rename the record of ``output`` so the next run redoes the stage (its files stay)."""
    record_uri = output.record_uri or output.path(SUCCESS)
    for uri in dict.fromkeys([record_uri, output.path(SUCCESS)]):
        if storage.exists(uri):
            storage.write_bytes(storage.join(posixpath.dirname(uri), INVALID), storage.read_bytes(uri))
            fs, path = storage.resolve(uri)
            fs.delete_file(path)


def _files(output: StageOutput) -> Optional[Mapping[str, tuple[int, str]]]:
    if output.files is not None:
        return output.files
    if is_complete(output.uri):  # an output made by hand from a finished directory
        return _expected(read_record(output.uri))
    return None


def table_files(output: StageOutput, table: str) -> list[str]:
    """URIs of the Parquet files of ``output``'s table directory ``table`` (those its record
    lists, so stray files are never read; a directory listing for record-less outputs)."""
    files = _files(output)
    if files is None:
        return storage.list_files(output.path(table), ".parquet")
    prefix = table.rstrip("/") + "/"
    return [output.path(rel) for rel in sorted(files) if rel.startswith(prefix) and rel.endswith(".parquet")]


def table_dir(output: StageOutput, table: str) -> str:
    """The directory of ``output``'s table ``table``, for readers that take a directory (Ray
    Data), after checking that it holds exactly the Parquet files its record lists, at their sizes.

    Ray Data is handed the directory rather than the file list: it resolves a list's paths in
    parallel threads, which races on a failing optional import (fsspec's HTTP filesystem without
    aiohttp) in Ray 2.6x. Raises :class:`StageDataError` naming the first extra, missing or
    resized file."""
    uri = output.path(table)
    files = _files(output)
    if files is None:
        return uri
    prefix = table.rstrip("/") + "/"
    recorded = {rel[len(prefix):]: size for rel, (size, _) in files.items() if rel.startswith(prefix)}
    present = {rel: size for rel, size in storage.file_sizes(uri).items() if rel.endswith(".parquet")}
    for rel in sorted(set(recorded) | set(present)):
        if rel.endswith(".parquet") and recorded.get(rel) != present.get(rel):
            state = ("not in the stage's completion record" if rel not in recorded else
                     "missing" if rel not in present else f"size {present[rel]} bytes, recorded {recorded[rel]}")
            raise StageDataError(f"{output.stage} stage output: {storage.join(uri, rel)}: {state}")
    return uri


def read_table(output: StageOutput, table: str, columns: list[str] | None = None, filter_expr=None) -> pa.Table:
    """The Parquet table directory ``table`` of a stage output, each file checked against the
    completion record (size and SHA-256) before it is parsed.

    Raises:
        FileNotFoundError: the table has no Parquet files.
        StageDataError: a file is missing, truncated, corrupted or lacks a column; the message
            names the file, and the stage's record is invalidated so the next run redoes it.
    """
    files = _files(output)
    uris = table_files(output, table)
    if not uris:
        raise FileNotFoundError(f"{output.stage}: {output.path(table)} holds no Parquet files")
    expected = None if files is None else {output.path(rel): entry for rel, entry in files.items()}
    try:
        return storage.read_parquet_dir(uris, columns=columns, filter_expr=filter_expr, expected=expected)
    except storage.FileCheckError as err:
        if files is not None and "missing column" not in err.reason:
            invalidate(output)
            raise StageDataError(f"{output.stage} stage output is damaged: {err}; its completion record was "
                                 f"invalidated, so the next run redoes the stage") from err
        raise StageDataError(f"{output.stage} stage output: {err}") from err


# --------------------------------------------------------------------------- the stage prologue


def publish(output_dir: str, stage: str, key: str, staging: str, summary: dict) -> StageOutput:
    """Publish a stage built in ``staging`` as (stage, key); see the module docstring."""
    final = stage_uri(output_dir, stage, key)
    storage.write_text(storage.join(staging, SUCCESS), _record(summary, "", _checksums(staging)))
    record = read_record(staging)
    if storage.is_remote(staging):  # no atomic rename: the record at {key} names the staging dir
        storage.write_text(storage.join(final, SUCCESS), _record(summary, posixpath.basename(staging), record["files"]))
        return StageOutput(stage, key, staging, cached=False, files=_expected(record),
                           record_uri=storage.join(final, SUCCESS))
    for _ in range(PUBLISH_ATTEMPTS):
        try:
            storage.move_dir(staging, final)
            return StageOutput(stage, key, final, cached=False, files=_expected(record),
                               record_uri=storage.join(final, SUCCESS))
        except OSError:
            existing = lookup(output_dir, stage, key)
            if existing is not None:  # a concurrent run published first: use its output
                storage.delete_dir(staging)
                return existing
            # Leftovers of an interrupted (or damaged) run: move them aside, then retry.
            trash = storage.join(output_dir, "stages", stage, f".{key}.trash-{uuid.uuid4().hex[:8]}")
            try:
                storage.move_dir(final, trash)
            except OSError:
                continue
            storage.delete_dir(trash)
    raise RuntimeError(f"{stage}: could not publish {staging} as {final} after {PUBLISH_ATTEMPTS} attempts")


def run_cached(
    output_dir: str,
    stage: str,
    key: str,
    build: Callable[[str], Optional[dict]],
    *,
    config: Any = None,
    describe: Optional[Callable[[dict], str]] = None,
    keep_failed: bool = False,
) -> StageOutput:
    """The stage prologue and epilogue, once for every stage.

    Returns the verified cached output of (stage, key) when there is one; else calls
    ``build(staging_uri)``, which writes the stage's files under ``staging_uri`` and returns its
    summary (a JSON-able dict), saves ``config`` (a RunConfig) there as ``config.yaml``, writes the
    completion record and publishes the directory (see the module docstring). ``describe(summary)``
    is printed once, with " [cached]" on a cache hit. A failing ``build`` leaves nothing published;
    its staging directory is deleted, or with ``keep_failed`` kept for inspection (e.g. ingest's
    quarantine table when every record was bad; ``build`` can name ``staging_uri`` in its error).
    """
    found = lookup(output_dir, stage, key)
    if found is not None:
        if describe is not None:
            head, newline, body = describe(read_summary(found.uri)).partition("\n")
            print(f"{head} [cached]{newline}{body}")  # on the header line, not after a table's last row
        return found
    staging = storage.join(output_dir, "stages", stage, f".{key}.{uuid.uuid4().hex[:12]}")
    try:
        summary = build(staging) or {}
        if config is not None:
            from pacl_ray.config import save_config

            save_config(config, staging)
        output = publish(output_dir, stage, key, staging, summary)
    except BaseException:
        if not keep_failed:
            storage.delete_dir(staging)
        raise
    if describe is not None:
        print(describe(summary))
    return output
