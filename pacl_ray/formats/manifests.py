"""Manifest readers: one input file at a time, every record numbered in its file, every fault kept
to its own record.

Each reader is a generator over one file that yields ``(row, source, row dict | Rejected)``; a
fault (invalid UTF-8, a line that is not JSON, a CSV row with the wrong number of fields, an
unterminated quote, a truncated tar member, an unreadable Parquet row group) becomes a
:class:`Rejected` for that record only, and reading goes on with the next record. Library readers
that fail on a whole file (pyarrow's JSON and CSV block readers, Ray's WebDataset reader) are
therefore not used for manifests: their errors cannot be attributed to a row.

:func:`read_file` turns one file into :data:`RECORD` tables. ``source`` is ``file:row``
(``shard#key`` for WebDataset) and ``position`` orders records by (file, row), so "the first
occurrence of an id" needs no driver-side numbering.

Accepted manifest forms (``image`` relative to the manifest's folder, absolute, or a pyarrow URI):

* **JSONL** (``.jsonl``/``.ndjson``/``.json``): one JSON object per line; row = line number
  (blank lines skipped). A ``.json`` file whose first character is ``[`` is a JSON list; row =
  element number. Numbers are kept as written, so ids ``1``, ``"01"`` and ``"007"`` stay distinct.
* **CSV/TSV** (``.csv``/``.tsv``; UTF-8, UTF-8 with BOM or UTF-16 with BOM; RFC 4180 quoting,
  newlines and delimiters inside quoted cells at any file size): a header row, then one record per
  row; row = record number after the header. Cells are strings; an empty cell is absent.
* **Parquet** (``.parquet``/``.pq``): row = 1-based row number. ``image`` may be a path string,
  the image **bytes inline** (a binary column), or the Hugging Face ``Image`` struct
  ``{bytes, path}`` (bytes win; else the path). ``id`` may be a string or integer column.
* **WebDataset** tar shards: members ``key.<ext>`` grouped by key; ``key.jpg|png|...`` is the
  image, ``key.txt`` the text, ``key.json`` metadata (``caption``/``text``, ``id`` and the
  optional columns). Hidden members (``._*``, ``__MACOSX/``) are ignored.
* **TumEmo**: ``<id>.txt`` per post (row 1 of that file), or a JSON list of
  ``{"id", "text", "emotion_label"}``, with images ``<id>.<ext>`` anywhere in the folder.

Columns: ``image``, ``text`` (required); ``id`` (else a hash of image reference and text, so
exact duplicate rows are caught); ``anps`` (string or list), ``factual_score``,
``emotional_score``, ``label`` (or ``emotion_label``), ``planted_partition`` (1-4), ``partition`` (a known
partition code 1-4, used as given instead of thresholding scores); other columns
are ignored.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import posixpath
import tarfile
from typing import Any, Iterator, Optional

import pyarrow as pa

from pacl_ray.formats import storage, tables

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
READ_CHUNK = 1 << 20
ROW_BITS = 40  # position = file_index << ROW_BITS | row: up to 2**40 rows per file, 2**23 files
csv.field_size_limit(64 << 20)  # long post texts are data; a cell past 64 MiB is a broken quote

# Columns of a normalised record, before validation (every format maps to these).
RECORD = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("source", pa.string()),  # file:row (shard#key), for messages
        pa.field("position", pa.int64()),  # (file index, row) as one sortable number
        pa.field("image_ref", pa.string()),  # path/URI to read, when the bytes are not inline
        pa.field("image_bytes", pa.binary()),  # inline bytes (WebDataset, Parquet binary/struct)
        pa.field("image_name", pa.string()),  # how the input named the image, for messages
        pa.field("text", pa.string()),
        pa.field("text_bytes", pa.binary()),  # undecoded text (tar members, text files, binary cells)
        pa.field("anps", pa.string()),
        pa.field("factual_score", pa.float32()),
        pa.field("emotional_score", pa.float32()),
        pa.field("label", pa.string()),
        pa.field("planted_partition", pa.int8()),
        pa.field("partition", pa.int8()),  # a known partition code 1-4, used as given
        # set when reading already found the record bad (malformed line, bad value, ...)
        pa.field("reason", pa.string()),
        pa.field("field", pa.string()),
        pa.field("detail", pa.string()),
    ]
)


class Rejected(Exception):
    """One record is bad: ``reason`` from tables.QUARANTINE_REASONS, the bad ``field``, a detail."""

    def __init__(self, reason: str, field: str, detail: str = ""):
        assert reason in tables.QUARANTINE_REASONS, reason
        super().__init__(f"{reason} ({field}): {detail}")
        self.reason, self.field, self.detail = reason, field, detail


class JsonNumber(str):
    """A JSON number kept exactly as written (``1``, ``1.50``, ``1e3``), so ids never change."""


# --------------------------------------------------------------------------- value checks


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and not isinstance(value, JsonNumber) and not value.strip()
    )


def _checked_str(value: str, name: str) -> str:
    """A string cell; invalid UTF-8 (kept as surrogates by the readers) is undecodable_text."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = value.encode("utf-8", "surrogateescape")[max(0, err.start - 20): err.end + 20]
        raise Rejected("undecodable_text", name, f"not UTF-8 near {bad!r}") from None
    return value


def _decoded(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as err:
        raise Rejected("undecodable_text", name, f"not UTF-8: {err}") from None


def as_id(value: Any) -> Optional[str]:
    """An id exactly as written: strings verbatim, integers in decimal; None when absent."""
    if _absent(value):
        return None
    if isinstance(value, bool):
        raise Rejected("bad_value", "id", f"a boolean is not an id: {value!r}")
    if isinstance(value, str):
        return _checked_str(value, "id")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # integer ids of a column with nulls, written by pandas as float
    if isinstance(value, (bytes, bytearray)):
        return _decoded(bytes(value), "id")
    raise Rejected("bad_value", "id", f"expected a string or integer, got {type(value).__name__} {value!r:.80}")


def as_text(value: Any) -> tuple[Optional[str], Optional[bytes]]:
    """The post text -> (str, None) or (None, undecoded bytes); absent -> (None, None)."""
    if value is None:
        return None, None
    if isinstance(value, (bytes, bytearray)):
        return None, bytes(value)
    if isinstance(value, str):  # JsonNumber included: a caption may be "2024"
        return _checked_str(value, "text"), None
    raise Rejected("bad_value", "text", f"expected a string, got {type(value).__name__} {value!r:.80}")


def as_image(value: Any, source: str) -> tuple[Optional[str], Optional[bytes], Optional[str]]:
    """The image column -> (reference, inline bytes, name for messages).

    A string is a reference; bytes are the encoded image; a ``{bytes, path}`` struct (Hugging
    Face ``datasets.Image``) is its bytes when present, else its path.
    """
    if _absent(value):
        return None, None, None
    if isinstance(value, (bytes, bytearray)):
        return None, bytes(value), f"{source} (inline bytes)"
    if isinstance(value, dict) and set(value) & {"bytes", "path"}:
        data, path = value.get("bytes"), value.get("path")
        if data:
            return None, bytes(data), f"{source} ({path or 'inline bytes'})"
        return as_image(path, source)
    if isinstance(value, str) and not isinstance(value, JsonNumber):
        image = _checked_str(value, "image").strip()
        return image, None, image
    raise Rejected("bad_value", "image", f"expected a path, bytes or {{bytes, path}}, got {type(value).__name__} {value!r:.80}")


def as_anps(value: Any) -> Optional[str]:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray":
        items = [as_anps(v) for v in list(value)]
        return "; ".join(i.strip() for i in items if i and i.strip()) or None
    if _absent(value):
        return None
    if isinstance(value, str):
        return _checked_str(value, "anps")
    raise Rejected("bad_value", "anps", f"expected a string or a list of strings, got {value!r:.80}")


def as_label(value: Any, name: str = "label") -> Optional[str]:
    if _absent(value):
        return None
    if isinstance(value, str):
        return _checked_str(value, name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise Rejected("bad_value", name, f"expected a string or number, got {value!r:.80}")


def as_float(value: Any, name: str) -> Optional[float]:
    if _absent(value):
        return None
    if isinstance(value, bool):
        raise Rejected("bad_value", name, f"not a number: {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise Rejected("bad_value", name, f"not a number: {value!r:.80}") from None
    if not math.isfinite(number):
        raise Rejected("bad_value", name, f"not finite: {value!r}")
    return number


def as_planted(value: Any, name: str = "planted_partition") -> Optional[int]:
    """A partition code 1-4 (``planted_partition``, or a given ``partition``); else bad_value."""
    if _absent(value):
        return None
    try:
        number = float(value)
        if isinstance(value, bool) or not number.is_integer():
            raise ValueError
    except (TypeError, ValueError):
        raise Rejected("bad_value", name, f"not an integer: {value!r:.80}") from None
    if int(number) not in (1, 2, 3, 4):
        raise Rejected("bad_value", name, f"must be 1-4, got {value}")
    return int(number)


def resolve_image_ref(image: str, manifest_uri: str) -> str:
    """An image reference as a readable URI: URIs and absolute paths as given, else relative to
    the manifest's folder."""
    if "://" in image or image.startswith("/"):
        return image
    base = manifest_uri.rsplit("/", 1)[0] if "://" in manifest_uri else posixpath.dirname(manifest_uri)
    return storage.join(base, image)


def content_id(image: Optional[str], text: Optional[str]) -> str:
    """A stable id for rows without one: a hash of image reference (or inline bytes' hash) and
    text, so exact duplicate rows are caught as duplicate ids and reordering keeps the ids."""
    blob = json.dumps(["pair", image or "", text or ""], sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def blank_record(source: str, position: int) -> dict:
    record = dict.fromkeys(RECORD.names)
    record.update(source=source, position=position)
    return record


def _reject(record: dict, bad: Rejected) -> dict:
    record.update(reason=bad.reason, field=bad.field, detail=bad.detail)
    return record


def normalize_row(row: dict, manifest_uri: str, source: str, position: int) -> dict:
    """One manifest row (column -> value) -> one :data:`RECORD` dict (bad values -> a verdict)."""
    record = blank_record(source, position)
    try:
        record["id"] = as_id(row.get("id"))
        ref, data, name = as_image(row.get("image"), source)
        record.update(image_ref=resolve_image_ref(ref, manifest_uri) if ref else None, image_bytes=data, image_name=name)
        record["text"], record["text_bytes"] = as_text(row.get("text"))
        if record["id"] is None:
            image_key = ref if data is None else "sha256:" + hashlib.sha256(data).hexdigest()
            text_key = record["text"] if record["text"] is not None else repr(record["text_bytes"])
            record["id"] = content_id(image_key, text_key)
        fill_optional(record, row)
    except Rejected as bad:
        return _reject(record, bad)
    return record


def fill_optional(record: dict, row: dict) -> None:
    """Copy the optional columns; raises :class:`Rejected` bad_value on a wrongly-typed value."""
    record["anps"] = as_anps(row.get("anps"))
    record["factual_score"] = as_float(row.get("factual_score"), "factual_score")
    record["emotional_score"] = as_float(row.get("emotional_score"), "emotional_score")
    label = row.get("label")
    record["label"] = as_label(label) if not _absent(label) else as_label(row.get("emotion_label"), "emotion_label")
    record["planted_partition"] = as_planted(row.get("planted_partition"))
    record["partition"] = as_planted(row.get("partition"), "partition")


# --------------------------------------------------------------------------- JSONL / JSON list


def _loads(text: str) -> Any:
    return json.loads(text, parse_int=JsonNumber, parse_float=JsonNumber)


def _json_object(text: str, where: str) -> dict:
    try:
        value = _loads(text)
    except json.JSONDecodeError as err:
        raise Rejected("malformed_record", "record", f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(value, dict):
        raise Rejected("malformed_record", "record", f"{where}: a JSON {type(value).__name__} where an object was expected")
    return value


def _byte_lines(stream) -> Iterator[tuple[int, bytes]]:
    """(line number, line without newline) of a binary stream, read in chunks."""
    tail, number = b"", 0
    while True:
        chunk = stream.read(READ_CHUNK)
        if not chunk:
            break
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        for line in lines:
            number += 1
            yield number, line
    if tail:
        yield number + 1, tail


def iter_json(uri: str) -> Iterator[tuple[int, Any]]:
    """(row, object | Rejected) of a JSONL file, or of a JSON list (a ``.json`` file starting with ``[``)."""
    fs, path = storage.resolve(uri)
    with fs.open_input_stream(path) as stream:
        head = stream.read(READ_CHUNK)
        if head.startswith(b"\xef\xbb\xbf"):
            head = head[3:]
        if uri.lower().endswith(".json") and head.lstrip()[:1] == b"[":
            yield from _json_list((head + stream.read()).decode("utf-8", "surrogateescape"))
            return
        for number, line in _byte_lines(_Prefixed(head, stream)):
            if not line.strip():
                continue
            try:
                yield number, _json_object(line.decode("utf-8", "surrogateescape"), f"line {number}")
            except Rejected as bad:
                yield number, bad


class _Prefixed:
    """A stream whose first bytes were already read (to sniff the format)."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, size: int) -> bytes:
        if self.head:
            out, self.head = self.head, b""
            return out
        return self.stream.read(size)


def _json_list(text: str) -> Iterator[tuple[int, Any]]:
    """Elements of a JSON list one by one, so a bad element is attributed to its number."""
    decoder = json.JSONDecoder(parse_int=JsonNumber, parse_float=JsonNumber)
    at, number = text.index("[") + 1, 0
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        if at >= len(text) or text[at] == "]":
            if at >= len(text):
                yield number + 1, Rejected("malformed_record", "record", f"element {number + 1}: the list is cut off (no closing ']')")
            return
        number += 1
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as err:
            yield number, Rejected(
                "malformed_record", "record",
                f"element {number}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                "the rest of the list cannot be read",
            )
            return
        if isinstance(value, dict):
            yield number, value
        else:
            yield number, Rejected("malformed_record", "record", f"element {number}: a JSON {type(value).__name__} where an object was expected")


# --------------------------------------------------------------------------- CSV / TSV


class _Lines:
    """Line source for ``csv.reader`` that numbers lines and can replay the lines of a record.

    When a record spanning several lines is broken (an open quote swallowed the lines after it),
    :meth:`replay_after_first` pushes all but its first line back, so they are parsed again as
    records of their own: a broken quote costs one record, not the rest of the file.
    """

    def __init__(self, text):
        self.text, self.line, self.pending, self.record = text, 0, [], []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self.pending.pop() if self.pending else self.text.readline()
        if not line:
            raise StopIteration
        self.line += 1
        self.record.append(line)
        return line

    def start_record(self) -> int:
        """Begin a record; returns the number of its first line."""
        self.record = []
        return self.line + 1

    def replay_after_first(self) -> None:
        again = self.record[1:]
        self.pending.extend(reversed(again))
        self.line -= len(again)
        self.record = self.record[:1]


def _csv_encoding(uri: str) -> str:
    fs, path = storage.resolve(uri)
    with fs.open_input_stream(path) as stream:
        head = stream.read(2)
    return "utf-16" if head in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"


def iter_csv(uri: str, delimiter: str = ",") -> Iterator[tuple[int, Any]]:
    """(row, {column: cell} | Rejected) of a CSV/TSV file with a header; row = record number.

    Parsed with RFC 4180 quoting (``csv`` in strict mode), streaming, so quoted newlines and
    delimiters work at any size. A row with the wrong number of fields or broken quoting is
    malformed_record; a broken record spanning several lines costs only itself (its later lines
    are parsed again). Undecodable bytes are kept as surrogates and reported per cell
    (undecodable_text) when the cell is used.
    """
    fs, path = storage.resolve(uri)
    header: Optional[list[str]] = None
    row = 0
    with fs.open_input_stream(path) as stream:
        text = io.TextIOWrapper(stream, encoding=_csv_encoding(uri), errors="surrogateescape", newline="")
        lines = _Lines(text)
        reader = csv.reader(lines, delimiter=delimiter, strict=True)
        while True:
            start = lines.start_record()
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                if header is None:
                    yield 0, Rejected("malformed_record", "header", f"line {start}: {err}; the file cannot be read")
                    return
                row += 1
                yield row, Rejected("malformed_record", "record", f"line {start}: {err}")
                if lines.line > start:
                    lines.replay_after_first()
                continue
            if not cells:
                continue  # blank line
            if header is None:
                header = [c.strip() for c in cells]
                continue
            row += 1
            if len(cells) != len(header):
                yield row, Rejected("malformed_record", "record", f"line {start}: {len(cells)} fields, the header has {len(header)}")
            else:
                yield row, {name: (cell if cell != "" else None) for name, cell in zip(header, cells)}


# --------------------------------------------------------------------------- Parquet


def iter_parquet(uri: str) -> Iterator[tuple[int, Any]]:
    """(row, {column: value} | Rejected) of a Parquet file, one row group at a time."""
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri)
    try:
        parquet = pq.ParquetFile(fs.open_input_file(path))
    except Exception as err:  # not Parquet, truncated footer, ...
        yield 0, Rejected("unreadable_file", "manifest", f"{uri} is not a readable Parquet file: {err}")
        return
    row = 0
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        try:
            table = parquet.read_row_group(group)
        except Exception as err:  # a corrupt page costs only the rows of its row group
            for _ in range(rows):
                row += 1
                yield row, Rejected("unreadable_file", "record", f"row group {group} cannot be read: {err}")
            continue
        for batch in table.to_batches(max_chunksize=4096):
            for values in batch.to_pylist():
                row += 1
                yield row, values


# --------------------------------------------------------------------------- WebDataset, TumEmo


def is_hidden(name: str) -> bool:
    """macOS/Windows/NAS side files: ``.DS_Store``, ``._x.jpg``, ``__MACOSX/``, ``Thumbs.db``, ..."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return any(p.startswith((".", "__MACOSX", "@eaDir")) for p in parts) or (
        bool(parts) and parts[-1].lower() in ("thumbs.db", "desktop.ini")
    )


def iter_webdataset(uri: str) -> Iterator[tuple[str, Any]]:
    """(key, {suffix: bytes} | Rejected) of a tar shard, streaming; members of one key are one sample.

    A shard that ends inside a sample (truncated download) costs that sample only.
    """
    fs, path = storage.resolve(uri)
    with fs.open_input_stream(path) as stream:
        sample: Optional[dict] = None
        member_name = ""
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    name = posixpath.normpath(member.name)
                    if not member.isfile() or is_hidden(name):
                        continue
                    member_name = name
                    folder, base = posixpath.split(name)
                    stem, _, suffix = base.partition(".")
                    key = posixpath.join(folder, stem)
                    if sample is None or sample["__key__"] != key:
                        if sample is not None:
                            yield sample["__key__"], sample
                        sample = {"__key__": key}
                    handle = tar.extractfile(member)
                    sample[suffix.lower()] = handle.read() if handle else b""
        except (tarfile.TarError, OSError, EOFError) as err:
            key = sample["__key__"] if sample is not None else member_name or "?"
            yield key, Rejected("malformed_record", member_name or "shard", f"the shard cannot be read past {member_name or 'its start'}: {err}")
            return
        if sample is not None:
            yield sample["__key__"], sample
    size = fs.get_file_info(path).size
    if uri.lower().endswith(".tar") and size % 512:  # tarfile stops quietly inside a cut header
        yield "", Rejected(
            "malformed_record", "shard", f"the shard is cut off ({size} bytes, not whole 512-byte blocks) after {member_name!r}")


def normalize_webdataset_sample(sample: dict, source: str, position: int) -> dict:
    """One WebDataset sample (``__key__`` and one entry per member suffix) -> a :data:`RECORD` dict."""
    record = blank_record(source, position)
    record["id"] = posixpath.basename(sample["__key__"])
    try:
        for suffix in IMAGE_SUFFIXES:
            if sample.get(suffix) is not None:
                record.update(image_bytes=sample[suffix], image_name=f"{source}.{suffix}")
                break
        meta: Any = {}
        if sample.get("json") is not None:
            try:
                meta = _loads(_decoded(sample["json"], "json"))
            except json.JSONDecodeError as err:
                raise Rejected("malformed_record", "json", f"unreadable metadata: {err}") from None
            meta = meta if isinstance(meta, dict) else {}
        if sample.get("txt") is not None:
            record["text_bytes"] = sample["txt"]
        else:
            record["text"], record["text_bytes"] = as_text(meta.get("caption", meta.get("text")))
        record["id"] = as_id(meta.get("id")) or record["id"]
        fill_optional(record, meta)
    except Rejected as bad:
        return _reject(record, bad)
    return record


def _stem(uri: str) -> str:
    return posixpath.splitext(posixpath.basename(uri))[0]


def tumemo_text_record(uri: str, data: bytes, images: dict, position: int) -> dict:
    """A TumEmo ``<id>.txt`` file -> a :data:`RECORD` dict; its image is ``images[id]``."""
    record = blank_record(uri, position)
    record.update(id=_stem(uri), text_bytes=data)
    return attach_image(record, images)


def attach_image(record: dict, images: dict) -> dict:
    """TumEmo: the image of a record is the image file named by its id (missing_file if none)."""
    image = images.get(record["id"])
    record["image_ref"] = record["image_name"] = image
    if image is None and not record["reason"]:
        _reject(record, Rejected("missing_file", "image", f"no image file for id {record['id']!r}"))
    return record


# --------------------------------------------------------------------------- one file -> records

KINDS = ("jsonl", "csv", "tsv", "parquet", "webdataset", "tumemo_text", "tumemo_json")


def iter_records(uri: str, kind: str, file_index: int, images: Optional[dict] = None) -> Iterator[dict]:
    """Every record of one input file as :data:`RECORD` dicts (bad ones carry their verdict)."""
    base = file_index << ROW_BITS
    if kind == "webdataset":
        for index, (key, sample) in enumerate(iter_webdataset(uri), start=1):
            source = f"{uri}#{key or 'end'}"
            if isinstance(sample, Rejected):
                yield _reject(dict(blank_record(source, base | index), id=posixpath.basename(key) or None), sample)
            else:
                yield normalize_webdataset_sample(sample, source, base | index)
        return
    if kind == "tumemo_text":
        fs, path = storage.resolve(uri)
        with fs.open_input_stream(path) as stream:
            yield tumemo_text_record(uri, stream.read(), images or {}, base | 1)
        return
    rows = {"jsonl": iter_json, "tumemo_json": iter_json, "parquet": iter_parquet,
            "csv": iter_csv, "tsv": lambda u: iter_csv(u, "\t")}[kind](uri)
    for row, value in rows:
        source = f"{uri}:{row}"
        if isinstance(value, Rejected):
            record = _reject(blank_record(source, base | row), value)
        else:
            record = normalize_row(value, uri, source, base | row)
        if kind == "tumemo_json" and record["id"] is not None:
            record = attach_image(record, images or {})
        yield record


def read_file(uri: str, kind: str, file_index: int, images: Optional[dict] = None, batch_rows: int = 1024) -> Iterator[pa.Table]:
    """One input file -> :data:`RECORD` tables of at most ``batch_rows`` rows (streaming)."""
    if kind not in KINDS:
        raise ValueError(f"unknown manifest kind {kind!r}; expected one of {KINDS}")
    batch: list[dict] = []
    for record in iter_records(uri, kind, file_index, images):
        batch.append(record)
        if len(batch) >= batch_rows:
            yield pa.Table.from_pylist(batch, schema=RECORD)
            batch = []
    if batch:
        yield pa.Table.from_pylist(batch, schema=RECORD)
