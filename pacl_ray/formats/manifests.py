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

Faults, the same in every reader:

* a whole-file problem (a CSV/TSV header or Parquet schema without ``image``/``text``, a Parquet
  column of the wrong type) is one :class:`ManifestSchemaError` (:func:`check_columns`), raised
  before any row; there is no config key mapping column names, so the message names the columns
  found, those expected and the likely rename;
* a record without a required value is missing_field: the detail says whether the key is absent
  (naming the keys the record has), null or empty; an empty or blank *text* is kept and
  quarantined by ingest as empty_text (a CSV empty cell is an empty value, not an absent one);
* types: text a string (bytes where the format holds bytes); image a path string, bytes or a
  ``{bytes, path}`` struct; id a string or integer (a JSON number kept as written, a float only
  when integral); label a string or number; anps a string or list of strings; scores and
  partition codes numbers or strings that parse. Anything else is wrong_type, the detail naming
  the field, the type found and the type expected; a string that does not parse, or a number out
  of range, is bad_value.
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


class ManifestSchemaError(ValueError):
    """A whole input file does not fit the manifest columns: its CSV header or Parquet schema lacks
    a required column, or a Parquet column has the wrong type. Raised once, before any row is
    read (:func:`check_columns`), naming the file, each problem, the columns found and the columns
    expected; a whole-file fault is never reported as one quarantined row per record."""


class JsonNumber(str):
    """A JSON number kept exactly as written (``1``, ``1.50``, ``1e3``), so ids never change."""


# --------------------------------------------------------------------------- value checks


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        isinstance(value, str) and not isinstance(value, JsonNumber) and not value.strip()
    )


def type_name(value: Any) -> str:
    """A value's type as the user wrote it, with an article (JSON's names for JSON values), for
    messages: "a number 123", "an object {a, b}", "a list", "null"."""
    if value is None:
        return "null"
    if isinstance(value, JsonNumber):
        return f"a number {value}"
    if isinstance(value, bool):
        return f"a boolean {str(value).lower()}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (bytes, bytearray)):
        return "bytes"
    if isinstance(value, int):
        return f"an integer {value}"
    if isinstance(value, float):
        return f"a float {value!r}"
    if isinstance(value, dict):
        return "an object {" + ", ".join(map(str, list(value)[:5])) + (", ...}" if len(value) > 5 else "}")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray":
        return "a list"
    return f"a {type(value).__name__}"


def wrong_type(name: str, value: Any, expected: str) -> Rejected:
    """The :class:`Rejected` (wrong_type) of field ``name`` holding ``value`` where ``expected`` belongs."""
    return Rejected("wrong_type", name, f"{name!r} is {type_name(value)}; expected {expected}")


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
    """An id exactly as written; None when absent.

    Ids are strings or integers: strings verbatim, integers in decimal, a JSON number exactly as
    written (``1.50`` stays ``"1.50"``), a float only when integral (pandas writes integer ids of a
    column with nulls as float). Anything else (boolean, list, object, 1.5 as a float) is
    wrong_type.
    """
    if _absent(value):
        return None
    if isinstance(value, bool):
        raise wrong_type("id", value, "a string or integer")
    if isinstance(value, str):
        return _checked_str(value, "id")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (bytes, bytearray)):
        return _decoded(bytes(value), "id")
    raise wrong_type("id", value, "a string or integer")


def as_text(value: Any) -> tuple[Optional[str], Optional[bytes]]:
    """The post text -> (str, None) or (None, undecoded bytes); absent -> (None, None).

    Text must be a string (bytes where the format holds bytes: tar members, binary columns); a
    JSON number, boolean, list or object is wrong_type. An empty or blank string is kept (ingest
    quarantines it as empty_text, in every format)."""
    if value is None:
        return None, None
    if isinstance(value, (bytes, bytearray)):
        return None, bytes(value)
    if isinstance(value, str) and not isinstance(value, JsonNumber):
        return _checked_str(value, "text"), None
    raise wrong_type("text", value, "a string")


def as_image(value: Any, source: str) -> tuple[Optional[str], Optional[bytes], Optional[str]]:
    """The image column -> (reference, inline bytes, name for messages).

    A string is a reference; bytes are the encoded image; a ``{bytes, path}`` struct (Hugging
    Face ``datasets.Image``) is its bytes when present, else its path. Anything else (a number,
    list, ...) is wrong_type.
    """
    if _absent(value):
        return None, None, None
    if isinstance(value, (bytes, bytearray)):
        return None, bytes(value), f"{source} (inline bytes)"
    if isinstance(value, dict) and set(value) & {"bytes", "path"}:
        data, path = value.get("bytes"), value.get("path")
        if data is not None and not isinstance(data, (bytes, bytearray)):
            raise wrong_type("image.bytes", data, "bytes")
        if data:
            return None, bytes(data), f"{source} ({path or 'inline bytes'})"
        return as_image(path, source)
    if isinstance(value, str) and not isinstance(value, JsonNumber):
        image = _checked_str(value, "image").strip()
        return image, None, image
    raise wrong_type("image", value, "a path string, image bytes or a {bytes, path} struct")


def as_anps(value: Any) -> Optional[str]:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray":
        items = []
        for item in list(value):
            if item is not None and (not isinstance(item, str) or isinstance(item, JsonNumber)):
                raise wrong_type("anps", item, "a string or a list of strings (an item of the list)")
            items.append(as_anps(item))
        return "; ".join(i.strip() for i in items if i and i.strip()) or None
    if _absent(value):
        return None
    if isinstance(value, str) and not isinstance(value, JsonNumber):
        return _checked_str(value, "anps")
    raise wrong_type("anps", value, "a string or a list of strings")


def as_label(value: Any, name: str = "label") -> Optional[str]:
    """A class label: a string, or a number (kept as written)."""
    if _absent(value):
        return None
    if isinstance(value, str):
        return _checked_str(value, name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise wrong_type(name, value, "a string or number")


def _number_or_text(value: Any, name: str, expected: str) -> Any:
    """Numbers and strings pass (CSV cells are strings; a string is parsed by the caller, and one
    that does not parse is bad_value); any other type is wrong_type."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise wrong_type(name, value, expected)
    return value


def as_float(value: Any, name: str) -> Optional[float]:
    if _absent(value):
        return None
    _number_or_text(value, name, "a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise Rejected("bad_value", name, f"not a number: {value!r:.80}") from None
    if not math.isfinite(number):
        raise Rejected("bad_value", name, f"not finite: {value!r}")
    return number


def as_planted(value: Any, name: str = "planted_partition") -> Optional[int]:
    """A partition code 1-4 (``planted_partition``, or a given ``partition``): a boolean, list,
    object or non-integral number is wrong_type, an integer outside 1-4 or an unparsable string
    bad_value."""
    if _absent(value):
        return None
    _number_or_text(value, name, "an integer 1-4")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise Rejected("bad_value", name, f"not an integer: {value!r:.80}") from None
    if not number.is_integer():
        if isinstance(value, str) and not isinstance(value, JsonNumber):
            raise Rejected("bad_value", name, f"not an integer: {value!r:.80}")
        raise wrong_type(name, value, "an integer 1-4")
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


REQUIRED = ("image", "text")
OPTIONAL = ("id", "anps", "factual_score", "emotional_score", "label", "emotion_label", "planted_partition", "partition")


def _require(row: dict, name: str) -> None:
    """missing_field when ``row`` has no value for ``name``; the detail says whether the key is
    absent (naming the keys the record has), null, or an empty string."""
    if name not in row:
        keys = ", ".join(map(str, row)) or "none"
        raise Rejected("missing_field", name, f"no {name!r} field; the record has: {keys}")
    value = row[name]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise Rejected("missing_field", name, f"{name!r} is null")
    if name != "text" and _absent(value):  # an empty text is empty_text (ingest's validation)
        raise Rejected("missing_field", name, f"{name!r} is empty")


def normalize_row(row: dict, manifest_uri: str, source: str, position: int, required: tuple = REQUIRED) -> dict:
    """One manifest row (column -> value) -> one :data:`RECORD` dict (bad values -> a verdict).

    ``required`` columns without a value are missing_field (an empty text is left for ingest's
    validation: empty_text); a value of the wrong type is wrong_type, naming the type found."""
    record = blank_record(source, position)
    try:
        record["id"] = as_id(row.get("id"))
        for name in required:
            _require(row, name)
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
    """Copy the optional columns; raises :class:`Rejected` wrong_type on a wrongly-typed value,
    bad_value on a bad value of the right type."""
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


def json_error(err: json.JSONDecodeError, line: bool = False) -> str:
    """A JSON parse error as ``<what> at [line L ]column C``: some of ``json``'s messages already end
    in "at" ("Unterminated string starting at"), which is not repeated."""
    what = err.msg.rstrip()
    where = (f"line {err.lineno} " if line else "") + f"column {err.colno}"
    return f"{what} {where}" if what.endswith(" at") else f"{what} at {where}"


def _json_object(text: str, where: str) -> dict:
    try:
        value = _loads(text)
    except json.JSONDecodeError as err:
        raise Rejected("malformed_record", "record", f"{where}: not valid JSON ({json_error(err)})") from None
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
                f"element {number}: not valid JSON ({json_error(err, line=True)}); "
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


DELIMITER_NAMES = {",": "comma", ";": "semicolon", "|": "pipe", "\t": "tab"}


def delimiter_hint(header: list[str], delimiter: str) -> Optional[str]:
    """Why a header read with ``delimiter`` lacks the required columns, when the file uses another
    one: the header is one cell (``delimiter`` never occurs in it) holding ``;``, ``|``, tab or a
    comma. None otherwise (a header that splits is judged by its columns).

    **Choice**: the delimiter is fixed by the suffix (``.csv`` comma, ``.tsv`` tab), not guessed
    (``csv.Sniffer``): post texts are full of commas and semicolons, so a guess can split a valid
    file wrongly and quarantine every row, or worse, read a wrong column; a header that only fits
    another delimiter gets this one-line explanation instead."""
    if all(name in header for name in REQUIRED):
        return None
    for other, name in DELIMITER_NAMES.items():
        if other == delimiter:
            continue
        if len(header) == 1 and other in header[0]:
            if delimiter == "\t":
                return f"the header looks {name}-separated; a .tsv must be tab-separated" + (
                    " (or save it as .csv for commas)" if other == "," else "")
            fix = "save it as .tsv" if other == "\t" else "or save it as .tsv for tabs"
            return f"the header looks {name}-separated; a .csv must be comma-separated ({fix})"
    return None


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
    are parsed again). A header without a required column raises :class:`ManifestSchemaError`
    (before any row). Undecodable bytes are kept as surrogates and reported per cell
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
                hint = delimiter_hint(header, delimiter)
                if hint:
                    raise ManifestSchemaError(f"{uri}: {hint} (header: {lines.record[0].rstrip()!r:.200})")
                check_columns(uri, {name: "string" for name in header})
                continue
            row += 1
            if len(cells) != len(header):
                yield row, Rejected("malformed_record", "record", f"line {start}: {len(cells)} fields, the header has {len(header)}")
            else:
                yield row, dict(zip(header, cells))  # an empty cell is an empty value, not an absent column


# --------------------------------------------------------------------------- whole-file checks

# Column -> (kinds a Parquet column may have, what to say is expected). A column of kind "null"
# (every value null) is always accepted: its rows are judged one by one.
COLUMN_KINDS = {
    "text": ({"string", "bytes"}, "string (or binary holding UTF-8 text)"),
    "image": ({"string", "bytes", "struct"}, "string path, binary image bytes or a {bytes, path} struct"),
    "id": ({"string", "integer", "float", "bytes"}, "string or integer"),
    "anps": ({"string", "list"}, "string or list of strings"),
    "factual_score": ({"integer", "float", "string"}, "number"),
    "emotional_score": ({"integer", "float", "string"}, "number"),
    "label": ({"string", "integer", "float"}, "string or number"),
    "emotion_label": ({"string", "integer", "float"}, "string or number"),
    "planted_partition": ({"integer", "float", "string"}, "integer 1-4"),
    "partition": ({"integer", "float", "string"}, "integer 1-4"),
}
# Column names often used for ours: named in the error as the likely rename.
ALIASES = {
    "caption": "text", "captions": "text", "txt": "text", "sentence": "text", "post": "text", "tweet": "text",
    "content": "text", "description": "text", "image_path": "image", "img": "image", "path": "image",
    "file": "image", "filename": "image", "file_name": "image", "url": "image", "image_url": "image",
    "jpg": "image", "picture": "image",
}


def arrow_kind(type_: pa.DataType) -> str:
    """A Parquet/Arrow column type as one of null, string, bytes, integer, float, boolean, list,
    struct or its own name (dictionary columns by their value type)."""
    t = pa.types
    if t.is_dictionary(type_):
        return arrow_kind(type_.value_type)
    checks = [("null", t.is_null), ("string", lambda x: t.is_string(x) or t.is_large_string(x)),
              ("bytes", lambda x: t.is_binary(x) or t.is_large_binary(x) or t.is_fixed_size_binary(x)),
              ("integer", t.is_integer), ("float", lambda x: t.is_floating(x) or t.is_decimal(x)),
              ("boolean", t.is_boolean),
              ("list", lambda x: t.is_list(x) or t.is_large_list(x) or t.is_fixed_size_list(x)),
              ("struct", t.is_struct)]
    for name, check in checks:
        if check(type_):
            if name == "list" and arrow_kind(type_.value_type) not in ("string", "null"):
                return f"list of {type_.value_type}"
            if name == "struct" and not {f.name for f in type_} & {"bytes", "path"}:
                return f"struct without bytes/path ({type_})"
            return name
    return str(type_)


def check_columns(uri: str, columns: dict, required: tuple = REQUIRED) -> None:
    """Raise :class:`ManifestSchemaError` when a file's columns (name -> :func:`arrow_kind`; a CSV
    header's are all "string") lack a ``required`` one or hold a known one of the wrong kind.

    The message (one line) names the file, each problem, the columns found, the columns expected,
    and a likely rename (``caption`` -> ``text``). No config key maps column names: the file's
    columns are renamed (for example with pandas or ``sed`` on the header line)."""
    problems = [f"no column {name!r}" for name in required if name not in columns]
    for name, kind in columns.items():
        allowed, expected = COLUMN_KINDS.get(name, (None, ""))
        if allowed is not None and kind != "null" and kind not in allowed:
            problems.append(f"column {name!r} is {kind}, expected {expected}")
    if not problems:
        return
    missing = {name for name in required if name not in columns}
    renames = [f"{c!r} -> {ALIASES[c.lower()]!r}" for c in columns if ALIASES.get(str(c).lower()) in missing]
    fix = (f"no config key maps column names, so rename the column in the file{': ' + ', '.join(renames) if renames else ''}"
           if missing else "write the column with the expected type")
    raise ManifestSchemaError(
        f"{uri}: {'; '.join(problems)} (columns found: {', '.join(map(str, columns)) or 'none'}; "
        f"expected {', '.join(required)} and optionally {', '.join(OPTIONAL)}; {fix})"
    )


def check_header(uri: str, kind: str) -> None:
    """Check a file's header (CSV/TSV) or schema (Parquet) alone, reading no rows:
    :class:`ManifestSchemaError` as :func:`check_columns`. Other kinds have no header: their
    records are checked one by one."""
    if kind in ("csv", "tsv"):
        rows = iter_csv(uri, "\t" if kind == "tsv" else ",")
        next(rows, None)  # the header is checked before the first row is yielded
        rows.close()
    elif kind == "parquet":
        import pyarrow.parquet as pq

        fs, path = storage.resolve(uri)
        try:
            schema = pq.read_schema(fs.open_input_file(path))
        except Exception:  # not Parquet: iter_parquet reports it as unreadable_file
            return
        check_columns(uri, {f.name: arrow_kind(f.type) for f in schema})


def has_records(uri: str, kind: str) -> bool:
    """Whether a file may hold a record, read only up to its first one: False for a file of 0
    bytes, a JSONL/JSON file of whitespace only, a CSV/TSV file with at most a header, a Parquet
    file of 0 rows. True when unsure (unreadable files are judged, and quarantined, by the readers)."""
    try:
        fs, path = storage.resolve(uri)
        if fs.get_file_info(path).size == 0:
            return False
        if kind in ("jsonl", "tumemo_json"):
            with fs.open_input_stream(path) as stream:
                while True:
                    chunk = stream.read(READ_CHUNK)
                    if not chunk:
                        return False
                    if chunk.replace(b"\xef\xbb\xbf", b"").strip():
                        return True
        if kind in ("csv", "tsv"):
            rows = iter_csv(uri, "\t" if kind == "tsv" else ",")
            try:
                return next(rows, None) is not None
            finally:
                rows.close()
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(fs.open_input_file(path)).metadata.num_rows > 0
    except Exception:  # a header problem or unreadable file is reported where it is read
        return True
    return True


# --------------------------------------------------------------------------- Parquet


def iter_parquet(uri: str) -> Iterator[tuple[int, Any]]:
    """(row, {column: value} | Rejected) of a Parquet file, one row group at a time; a schema
    without a required column, or with a column of the wrong type, raises
    :class:`ManifestSchemaError` (before any row)."""
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri)
    try:
        parquet = pq.ParquetFile(fs.open_input_file(path))
    except Exception as err:  # not Parquet, truncated footer, ...
        yield 0, Rejected("unreadable_file", "manifest", f"{uri} is not a readable Parquet file: {err}")
        return
    check_columns(uri, {f.name: arrow_kind(f.type) for f in parquet.schema_arrow})
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
    """One WebDataset sample (``__key__`` and one entry per member suffix) -> a :data:`RECORD` dict.

    The text is the ``.txt`` member, else ``caption`` (or ``text``) of the ``.json`` member; a
    sample without an image member or without a text is missing_field (the detail names its
    members and metadata keys), metadata that is not a JSON object, or a caption that is not a
    string, wrong_type."""
    record = blank_record(source, position)
    record["id"] = posixpath.basename(sample["__key__"])
    members = ", ".join(f".{k}" for k in sample if k != "__key__") or "none"
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
                raise Rejected("malformed_record", "json", f"unreadable metadata: {json_error(err, line=True)}") from None
            if not isinstance(meta, dict):
                raise wrong_type("json", meta, "a JSON object")
        record["id"] = as_id(meta.get("id")) or record["id"]
        if record["image_bytes"] is None:
            raise Rejected("missing_field", "image", f"no image member (.{', .'.join(IMAGE_SUFFIXES)}); "
                                                     f"the sample has: {members}")
        if sample.get("txt") is not None:
            record["text_bytes"] = sample["txt"]
        else:
            name = "caption" if "caption" in meta else "text"
            if meta.get(name) is None:
                keys = ", ".join(meta) or "none"
                raise Rejected("missing_field", "text", f"no .txt member and no 'caption'/'text' in .json; "
                                                        f"the sample has: {members}; .json keys: {keys}")
            try:
                record["text"], record["text_bytes"] = as_text(meta[name])
            except Rejected as bad:
                raise Rejected(bad.reason, bad.field, bad.detail.replace("'text'", f"{name!r} in .json")) from None
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
            record = normalize_row(value, uri, source, base | row, ("text",) if kind == "tumemo_json" else REQUIRED)
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
