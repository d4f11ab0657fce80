"""Stage 0: image-text manifests into one validated Parquet table, bad records quarantined.

Inputs (``cfg.ingest.manifest``; ``cfg.ingest.format`` = auto picks by suffix / folder contents):

* a JSONL (``.jsonl``/``.ndjson``; ``.json`` may also be a JSON list), CSV or Parquet manifest,
  or a folder of them, with ``image`` (relative to the manifest's folder, absolute, or a pyarrow
  URI such as ``s3://``) and ``text``; optional ``id``, ``anps`` (string or list), ``factual_score``,
  ``emotional_score``, ``label``, ``planted_partition``, ``partition`` (a known partition code
  1-4, used as given instead of thresholding scores);
* WebDataset tar shards as img2dataset writes them (``key.jpg``/``.png`` + ``key.txt`` and/or
  ``key.json`` with a ``caption``/``text``), a ``.tar`` file, a folder or a glob;
* the TumEmo layout: a folder of ``<id>.jpg`` images with ``<id>.txt`` texts, or with a JSON list
  of ``{"id", "text", "emotion_label"}``.

Every format is read with a Ray Data reader and normalised to the same record columns, then
validated in ``map_batches`` tasks (image read, decode, RGB conversion; text decode and cleaning).
Duplicate ids need a global view, so a driver-side pass over the ids (no image bytes) finds them;
the first occurrence (by source file and row) is kept.

Outputs under ``{output_dir}/stages/ingest/{key}``: ``pairs/`` (:data:`tables.PAIRS`, image bytes
inline), ``quarantine/`` (:data:`tables.QUARANTINE`), ``config.yaml`` and ``_SUCCESS`` with the
counts per reason. If every record is bad, :class:`IngestError` is raised with that summary.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import math
import posixpath
import warnings
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.fs as pafs

from pacl_ray.stages import cache
from pacl_ray.formats import tables
from pacl_ray.formats import storage
from pacl_ray.config import RunConfig, save_config
from pacl_ray.core.text import clean_text

STAGE = "ingest"
INGEST_VERSION = 2  # bump when validation changes what a given input produces
FORMATS = ("jsonl", "csv", "parquet", "webdataset", "tumemo")
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MANIFEST_SUFFIXES = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet",
}
VALIDATE_BATCH_SIZE = 64

# Columns of a normalised record, before validation (every format maps to these).
RECORD = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("image_ref", pa.string()),  # path/URI to read, when the bytes are not inline
        pa.field("image_bytes", pa.binary()),  # inline bytes (WebDataset)
        pa.field("image_name", pa.string()),  # how the input named the image, for messages
        pa.field("text", pa.string()),
        pa.field("text_bytes", pa.binary()),  # undecoded text (CSV, tar members, text files)
        pa.field("anps", pa.string()),
        pa.field("factual_score", pa.float32()),
        pa.field("emotional_score", pa.float32()),
        pa.field("label", pa.string()),
        pa.field("planted_partition", pa.int8()),
        pa.field("partition", pa.int8()),
        # set when normalisation already found the record bad (e.g. a bad score value)
        pa.field("reason", pa.string()),
        pa.field("field", pa.string()),
        pa.field("detail", pa.string()),
    ]
)

# Validated records: PAIRS columns (nullable, since bad rows have no image) plus the verdict.
VALIDATED = pa.schema(
    [f.with_nullable(True) for f in tables.PAIRS]
    + [pa.field("reason", pa.string()), pa.field("field", pa.string()), pa.field("detail", pa.string()),
       pa.field("content_digest", pa.string())]  # hash of id, image and text (pairs_fingerprint)
)


class IngestError(RuntimeError):
    """Ingest cannot produce a usable table (no input, or every record is bad)."""

    def __init__(self, message: str, summary: Optional[dict] = None):
        super().__init__(message)
        self.summary = summary or {}


class Rejected(Exception):
    """One record is bad: ``reason`` from tables.QUARANTINE_REASONS, the bad ``field``, a detail."""

    def __init__(self, reason: str, field: str, detail: str = ""):
        assert reason in tables.QUARANTINE_REASONS, reason
        super().__init__(f"{reason} ({field}): {detail}")
        self.reason, self.field, self.detail = reason, field, detail


# --------------------------------------------------------------------------- validation (pure-ish)


def read_image_file(uri: str) -> bytes:
    """The bytes of an image file; :class:`Rejected` (missing/unreadable_file) when it cannot be read."""
    try:
        fs, path = storage.resolve(uri)
        info = fs.get_file_info(path)
    except Exception as err:  # bad URI scheme, unreachable bucket, ...
        raise Rejected("unreadable_file", "image", f"{uri}: {err}") from err
    if info.type == pafs.FileType.NotFound:
        raise Rejected("missing_file", "image", f"{uri}: no such file")
    if info.type != pafs.FileType.File:
        raise Rejected("unreadable_file", "image", f"{uri}: not a regular file ({info.type.name})")
    try:
        with fs.open_input_stream(path) as handle:
            return handle.read()
    except OSError as err:
        raise Rejected("unreadable_file", "image", f"{uri}: {err}") from err


def _to_rgb(image):
    """RGB copy of a PIL image; transparent pixels become white rather than black."""
    from PIL import Image

    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def check_image(data: bytes, max_image_pixels: int) -> tuple[bytes, int, int, Optional[str]]:
    """Validate encoded image bytes -> (RGB image bytes, width, height, original mode or None).

    Non-RGB images (CMYK, L, LA, P, RGBA, ...) are converted and re-encoded (JPEG stays JPEG,
    everything else becomes PNG); RGB images keep their original bytes. Raises :class:`Rejected`
    with zero_size_image, decompression_bomb (Pillow's MAX_IMAGE_PIXELS set to
    ``max_image_pixels``; 0 disables), corrupt_image or truncated_image.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise Rejected("zero_size_image", "image", "the file is empty (0 bytes)")
    previous_limit = Image.MAX_IMAGE_PIXELS
    # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; both count as bombs here.
    Image.MAX_IMAGE_PIXELS = max_image_pixels if max_image_pixels > 0 else None
    try:
        return _check_image(data, Image, UnidentifiedImageError)
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit


def _broken_image_reason(err: Exception) -> str:
    """Pillow reports a cut-off file as an OSError mentioning truncation; anything else is corrupt."""
    return "truncated_image" if isinstance(err, OSError) and "truncated" in str(err).lower() else "corrupt_image"


def _check_image(data: bytes, Image, UnidentifiedImageError) -> tuple[bytes, int, int, Optional[str]]:
    bomb_errors = (Image.DecompressionBombError, Image.DecompressionBombWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except bomb_errors as err:
            raise Rejected("decompression_bomb", "image", str(err)) from err
        except UnidentifiedImageError as err:
            raise Rejected("corrupt_image", "image", f"not a recognised image ({len(data)} bytes)") from err
        except Exception as err:  # e.g. OSError "Truncated File Read" inside the header
            raise Rejected(_broken_image_reason(err), "image", f"{type(err).__name__}: {err}") from err
        width, height = image.size
        if width <= 0 or height <= 0:
            raise Rejected("zero_size_image", "image", f"{width}x{height} pixels")
        try:
            image.load()
        except bomb_errors as err:
            raise Rejected("decompression_bomb", "image", str(err)) from err
        except Exception as err:  # Pillow raises OSError/SyntaxError/ValueError for broken streams
            raise Rejected(_broken_image_reason(err), "image", f"{type(err).__name__}: {err}") from err
    if image.mode == "RGB":
        return data, width, height, None
    fmt = "JPEG" if image.format == "JPEG" else "PNG"
    buffer = io.BytesIO()
    _to_rgb(image).save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue(), width, height, image.mode


def decode_text(text: Optional[str], text_bytes: Optional[bytes]) -> str:
    """The post text as str; :class:`Rejected` for missing, undecodable or blank text."""
    if text is None and text_bytes is not None:
        try:
            text = text_bytes.decode("utf-8")
        except UnicodeDecodeError as err:
            raise Rejected("undecodable_text", "text", f"not UTF-8: {err}") from err
    if text is None:
        raise Rejected("missing_field", "text", "no text")
    if not text.strip():
        raise Rejected("empty_text", "text", "the text is empty or whitespace only")
    return text


def validate_record(record: dict, max_image_pixels: int, clean: bool) -> dict:
    """One normalised record (:data:`RECORD`) -> one validated row (:data:`VALIDATED`)."""
    out = {
        "id": record["id"], "source": record["source"], "image_source": record["image_name"],
        "anps": record["anps"], "factual_score": record["factual_score"],
        "emotional_score": record["emotional_score"], "label": record["label"],
        "planted_partition": record["planted_partition"], "partition": record["partition"],
        "reason": None, "field": None, "detail": None, "content_digest": None,
    }
    try:
        if record["reason"]:
            raise Rejected(record["reason"], record["field"], record["detail"] or "")
        if not record["id"]:
            raise Rejected("missing_field", "id", "empty id")
        text_raw = decode_text(record["text"], record["text_bytes"])
        cleaned = clean_text(text_raw) if clean else text_raw.strip()
        if not cleaned:
            raise Rejected("empty_text", "text", f"nothing left after cleaning {text_raw[:80]!r}")
        data = record["image_bytes"]
        if data is None:
            if not record["image_ref"]:
                raise Rejected("missing_field", "image", "no image")
            data = read_image_file(record["image_ref"])
        image, width, height, converted_from = check_image(data, max_image_pixels)
    except Rejected as bad:
        out.update(reason=bad.reason, field=bad.field, detail=bad.detail)
        return out
    out.update(
        image=image, width=width, height=height, converted_from=converted_from,
        text_raw=text_raw, text=cleaned, content_digest=content_digest(record["id"], image, cleaned),
    )
    return out


def validate_batch(batch: pa.Table, max_image_pixels: int, clean: bool) -> pa.Table:
    """Ray Data UDF: normalised records -> validated rows (bad rows carry reason/field/detail)."""
    rows = [validate_record(r, max_image_pixels, clean) for r in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=VALIDATED)


# --------------------------------------------------------------------------- normalisation


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    try:  # pandas.NA / NaT
        import pandas as pd

        return not (pd.api.types.is_scalar(value) and pd.isna(value))
    except (ImportError, TypeError, ValueError):
        return True


def _as_str(value: Any) -> Optional[str]:
    if not _present(value):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # ids that pandas read as floats because of NaNs
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _optional(value: Any) -> Any:
    """Optional columns: blank strings (empty CSV cells) mean absent."""
    return None if isinstance(value, str) and not value.strip() else value


def _as_anps(value: Any) -> Optional[str]:
    import numpy as np

    if isinstance(value, (list, tuple, np.ndarray)):
        items = [str(v).strip() for v in list(value) if _present(v) and str(v).strip()]
        return "; ".join(items) or None
    return _as_str(value)


def _as_float(value: Any, name: str) -> Optional[float]:
    if not _present(value):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise Rejected("bad_value", name, f"not a number: {value!r}") from err
    if not math.isfinite(number):
        raise Rejected("bad_value", name, f"not finite: {value!r}")
    return number


def _as_planted(value: Any, name: str = "planted_partition") -> Optional[int]:
    """A partition code 1-4 (``planted_partition`` or a given ``partition``), else bad_value."""
    if not _present(value):
        return None
    try:
        code = int(value)
        if code != float(value):
            raise ValueError(value)
    except (TypeError, ValueError) as err:
        raise Rejected("bad_value", name, f"not an integer: {value!r}") from err
    if code not in (1, 2, 3, 4):
        raise Rejected("bad_value", name, f"must be 1-4, got {code}")
    return code


def _blank_record(source: str) -> dict:
    record = {name: None for name in RECORD.names}
    record["source"] = source
    return record


def _fill_optional(record: dict, row: dict) -> None:
    """Copy the optional columns, turning bad values into a bad_value verdict on the record."""
    try:
        record["anps"] = _as_anps(_optional(row.get("anps")))
        record["factual_score"] = _as_float(_optional(row.get("factual_score")), "factual_score")
        record["emotional_score"] = _as_float(_optional(row.get("emotional_score")), "emotional_score")
        label = row.get("label") if _present(row.get("label")) else row.get("emotion_label")
        record["label"] = _as_str(_optional(label))
        record["planted_partition"] = _as_planted(_optional(row.get("planted_partition")))
        record["partition"] = _as_planted(_optional(row.get("partition")), "partition")
    except Rejected as bad:
        record.update(reason=bad.reason, field=bad.field, detail=bad.detail)


def resolve_image_ref(image: str, manifest_uri: str) -> str:
    """An image reference as a readable URI: URIs and absolute paths as given, else relative to
    the manifest's folder."""
    if "://" in image or image.startswith("/"):
        return image
    base = manifest_uri.rsplit("/", 1)[0] if "://" in manifest_uri else posixpath.dirname(manifest_uri)
    return storage.join(base, image)


def content_id(image: Optional[str], text: Optional[str]) -> str:
    """A stable id for manifest rows without one: a hash of image reference and text, so that
    exact duplicate rows are caught as duplicate ids and reordering a manifest keeps the ids."""
    return cache.content_key("pair", image or "", text or "")


def normalize_manifest_row(row: dict, manifest_uri: str, row_number: int) -> dict:
    """One manifest row (dict of its columns) -> one :data:`RECORD` dict."""
    record = _blank_record(f"{manifest_uri}:{row_number}")
    image = _as_str(row.get("image"))
    record["image_name"] = image
    record["image_ref"] = resolve_image_ref(image, manifest_uri) if image else None
    text = row.get("text")
    if isinstance(text, bytes):
        record["text_bytes"] = text
    else:
        record["text"] = _as_str(text)
    text_key = record["text"] if record["text"] is not None else repr(record["text_bytes"])
    record["id"] = _as_str(row.get("id")) or content_id(image, text_key)
    _fill_optional(record, row)
    return record


def normalize_webdataset_row(row: dict) -> dict:
    """One WebDataset sample (``__key__``, ``__url__``, one column per member suffix)."""
    record = _blank_record(f"{row.get('__url__') or row.get('path')}#{row['__key__']}")
    record["id"] = posixpath.basename(str(row["__key__"]))
    for suffix in IMAGE_SUFFIXES:
        if _present(row.get(suffix)):
            record["image_bytes"] = bytes(row[suffix])
            record["image_name"] = f"{record['source']}.{suffix}"
            break
    meta: dict = {}
    if _present(row.get("json")):
        try:
            meta = json.loads(bytes(row["json"]).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            record.update(reason="bad_value", field="json", detail=f"unreadable metadata: {err}")
            return record
        if not isinstance(meta, dict):
            meta = {}
    if _present(row.get("txt")):
        record["text_bytes"] = bytes(row["txt"])
    else:
        record["text"] = _as_str(meta.get("caption", meta.get("text")))
    if meta.get("id") is not None:
        record["id"] = _as_str(meta["id"])
    _fill_optional(record, meta)
    return record


def _manifest_batches(ds, uri_of_path: dict) -> list[pa.Table]:
    """Driver pass over manifest rows in file order, numbering rows per file (1-based).

    Manifests hold only references and text, so this pass is small; images are read later in
    parallel tasks.
    """
    row_numbers: dict[str, int] = {}
    tables = []
    # Small tables, so that validation (one task per block) runs in parallel.
    for df in ds.iter_batches(batch_format="pandas", batch_size=4 * VALIDATE_BATCH_SIZE):
        records = []
        for row in df.to_dict("records"):
            path = row.pop("path", None)
            uri = uri_of_path.get(path, path)
            row_numbers[uri] = row_numbers.get(uri, 0) + 1
            records.append(normalize_manifest_row(row, uri, row_numbers[uri]))
        tables.append(pa.Table.from_pylist(records, schema=RECORD))
    return tables


def _webdataset_batch(batch) -> pa.Table:
    rows = batch.to_dict("records")
    return pa.Table.from_pylist([normalize_webdataset_row(r) for r in rows], schema=RECORD)


def _text_file_batch(batch, images: dict) -> pa.Table:
    """TumEmo per-id text files (read_binary_files rows: bytes, path) -> records."""
    records = []
    for row in batch.to_dict("records"):
        path = row["path"]
        stem = posixpath.splitext(posixpath.basename(path))[0]
        record = _blank_record(path)
        record.update(id=stem, text_bytes=bytes(row["bytes"]))
        image = images.get(stem)
        record["image_ref"] = record["image_name"] = image
        if image is None:
            record.update(reason="missing_file", field="image", detail=f"no image file for id {stem!r}")
        records.append(record)
    return pa.Table.from_pylist(records, schema=RECORD)


# --------------------------------------------------------------------------- inputs


def _has_glob(uri: str) -> bool:
    return any(ch in uri for ch in "*?[")


def expand_inputs(manifest: str) -> list[str]:
    """The input files of a manifest path: the file itself, a folder's files, or a glob's matches."""
    if _has_glob(manifest):
        base = manifest
        while _has_glob(base):
            base = base.rsplit("/", 1)[0]
        pattern = storage.normalize(manifest)
        return [f for f in storage.list_files(base) if fnmatch.fnmatch(f, pattern)]
    fs, path = storage.resolve(manifest)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise IngestError(f"ingest.manifest: {manifest} does not exist")
    if info.type == pafs.FileType.Directory:
        return storage.list_files(manifest)
    return [storage.normalize(manifest)]


def _suffix(uri: str) -> str:
    return posixpath.splitext(uri.lower())[1]


def detect_format(manifest: str, files: list[str], requested: str = "auto") -> str:
    """The input format: ``requested`` unless "auto", else by suffix or folder contents."""
    if requested != "auto":
        if requested not in FORMATS:
            raise IngestError(f"ingest.format: {requested!r} is not one of auto, {', '.join(FORMATS)}")
        return requested
    suffixes = {_suffix(f) for f in files}
    if ".tar" in suffixes:
        return "webdataset"
    if any(s.lstrip(".") in IMAGE_SUFFIXES for s in suffixes):
        return "tumemo"
    kinds = {MANIFEST_SUFFIXES[s] for s in suffixes if s in MANIFEST_SUFFIXES}
    if len(kinds) == 1:
        return kinds.pop()
    raise IngestError(
        f"ingest.manifest: cannot tell the format of {manifest} (suffixes {sorted(suffixes)}); "
        f"set ingest.format to one of {', '.join(FORMATS)}"
    )


def _fs_paths(uris: list[str]) -> dict:
    """Ray's include_paths column holds filesystem paths (no scheme); map them back to URIs."""
    return {storage.resolve(u)[1]: u for u in uris}


def read_records(manifest: str, fmt: str, files: list[str]):
    """A Ray Dataset of normalised :data:`RECORD` rows for any supported input format."""
    import ray

    if fmt in ("jsonl", "csv", "parquet"):
        wanted = [f for f in files if MANIFEST_SUFFIXES.get(_suffix(f)) == fmt] or files
        return _read_manifest(wanted, fmt)
    if fmt == "webdataset":
        shards = [f for f in files if _suffix(f) == ".tar"]
        if not shards:
            raise IngestError(f"ingest.manifest: no .tar shards in {manifest}")
        ds = ray.data.read_webdataset(shards, decoder=None, include_paths=True)
        return ds.map_batches(_webdataset_batch, batch_format="pandas", batch_size=VALIDATE_BATCH_SIZE)
    if fmt == "tumemo":
        return _read_tumemo(manifest, files)
    raise IngestError(f"unknown format {fmt!r}")


def _read_manifest(files: list[str], fmt: str):
    import pyarrow.csv as pacsv
    import ray
    from ray.data import DataContext

    ctx = DataContext.get_current()
    preserve = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # row numbers in messages follow the file
    try:
        if fmt == "jsonl":
            by_kind = {True: [f for f in files if _suffix(f) != ".json"], False: [f for f in files if _suffix(f) == ".json"]}
            tables = []
            for lines, group in by_kind.items():
                if group:
                    ds = ray.data.read_json(group, lines=lines, include_paths=True, file_extensions=None)
                    tables += _manifest_batches(ds, _fs_paths(group))
        elif fmt == "csv":
            # Text stays bytes so that one undecodable row is quarantined, not the whole file.
            types = {"text": pa.binary(), "id": pa.string(), "image": pa.string(), "anps": pa.string(), "label": pa.string()}
            parse = pacsv.ParseOptions(delimiter="\t") if all(_suffix(f) == ".tsv" for f in files) else None
            kwargs = {"parse_options": parse} if parse else {}
            ds = ray.data.read_csv(
                files, include_paths=True, convert_options=pacsv.ConvertOptions(column_types=types), **kwargs
            )
            tables = _manifest_batches(ds, _fs_paths(files))
        else:
            ds = ray.data.read_parquet(files, include_paths=True)
            tables = _manifest_batches(ds, _fs_paths(files))
    finally:
        ctx.execution_options.preserve_order = preserve
    if not tables:
        raise IngestError(f"ingest.manifest: no rows in {', '.join(files)}")
    return ray.data.from_arrow(tables)


def _read_tumemo(manifest: str, files: list[str]):
    import ray

    images = {}
    for f in files:
        if _suffix(f).lstrip(".") in IMAGE_SUFFIXES:
            images.setdefault(posixpath.splitext(posixpath.basename(f))[0], f)
    json_lists = [f for f in files if _suffix(f) in (".json", ".jsonl")]
    if json_lists:
        ds = _read_manifest(json_lists, "jsonl")

        def attach_images(batch: pa.Table) -> pa.Table:
            rows = batch.to_pylist()
            for r in rows:
                r["image_ref"] = images.get(r["id"])
                if r["image_ref"] is None and not r["reason"]:
                    r.update(reason="missing_file", field="image", detail=f"no image file for id {r['id']!r}")
                r["image_name"] = r["image_ref"]
            return pa.Table.from_pylist(rows, schema=RECORD)

        return ds.map_batches(attach_images, batch_format="pyarrow")
    texts = [f for f in files if _suffix(f) == ".txt"]
    if not texts:
        raise IngestError(f"ingest.manifest: TumEmo folder {manifest} has neither a JSON list nor .txt files")
    ds = ray.data.read_binary_files(texts, include_paths=True)
    uri_of_path = _fs_paths(texts)
    text_ids = {posixpath.splitext(posixpath.basename(f))[0] for f in texts}
    records = ds.map_batches(
        _text_file_batch, batch_format="pandas", fn_kwargs={"images": images}
    ).map_batches(_restore_uris, batch_format="pyarrow", fn_kwargs={"uri_of_path": uri_of_path})
    orphans = []
    for stem, uri in sorted(images.items()):
        if stem not in text_ids:
            record = _blank_record(uri)
            record.update(id=stem, image_ref=uri, image_name=uri, reason="missing_field",
                          field="text", detail=f"no text file for id {stem!r}")
            orphans.append(record)
    if orphans:
        records = records.union(ray.data.from_arrow(pa.Table.from_pylist(orphans, schema=RECORD)))
    return records


def _restore_uris(batch: pa.Table, uri_of_path: dict) -> pa.Table:
    sources = [uri_of_path.get(s, s) for s in batch.column("source").to_pylist()]
    return batch.set_column(batch.schema.get_field_index("source"), "source", pa.array(sources, pa.string()))


# --------------------------------------------------------------------------- duplicates and outputs


def _source_order(source: str) -> tuple:
    """Sort key that orders "file:12" before "file:100"."""
    head, _, tail = source.rpartition(":")
    return (head, int(tail), "") if tail.isdigit() else (source, -1, "")


def find_duplicates(ids: Iterable[str], sources: Iterable[str]) -> dict[str, str]:
    """{source of a duplicate: source of the kept first occurrence} over valid rows."""
    first: dict[str, str] = {}
    duplicates: dict[str, str] = {}
    for record_id, source in sorted(zip(ids, sources), key=lambda p: _source_order(p[1])):
        if record_id in first:
            duplicates[source] = first[record_id]
        else:
            first[record_id] = source
    return duplicates


def content_digest(pair_id: str, image: bytes, text: str) -> str:
    """One pair's identity for the upstream stages: SHA-256 of its id, stored image bytes and
    cleaned text (what embedding and clustering read), not of its scores or partition."""
    digest = hashlib.sha256()
    for part in (pair_id.encode("utf-8"), hashlib.sha256(image).digest(), text.encode("utf-8")):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def pairs_fingerprint(ids: Iterable[str], digests: Iterable[str]) -> str:
    """Order-independent fingerprint of the stored pairs' ids, images and texts (the summary's
    ``content_fingerprint``): embed and cluster are keyed by it, so a manifest that changes only
    scores or partitions re-runs only scoring and partitioning."""
    return cache.content_key("pairs-content", sorted(zip(ids, digests)))


def _pairs_only(batch: pa.Table, drop_sources: set) -> pa.Table:
    """Valid, non-duplicate rows of a validated batch, as :data:`tables.PAIRS`."""
    import pyarrow.compute as pc

    keep = pc.is_null(batch.column("reason"))
    if drop_sources:
        keep = pc.and_(keep, pc.invert(pc.is_in(batch.column("source"), pa.array(sorted(drop_sources), pa.string()))))
    return batch.filter(keep).select(tables.PAIRS.names).cast(tables.PAIRS)


def summarize(counts: dict[str, int], pairs: int, converted: dict[str, int]) -> dict:
    quarantined = sum(counts.values())
    return {
        "records": pairs + quarantined,
        "pairs": pairs,
        "quarantined": quarantined,
        "quarantine_reasons": {r: counts.get(r, 0) for r in tables.QUARANTINE_REASONS if counts.get(r)},
        "converted_to_rgb": converted,
    }


def format_summary(summary: dict) -> str:
    reasons = ", ".join(f"{r}={n}" for r, n in summary["quarantine_reasons"].items()) or "none"
    converted = ", ".join(f"{m}={n}" for m, n in summary["converted_to_rgb"].items()) or "none"
    return (
        f"ingest: {summary['records']} records -> {summary['pairs']} pairs, "
        f"{summary['quarantined']} quarantined ({reasons}); converted to RGB: {converted}"
    )


def ingest_key(cfg: RunConfig, files: list[str], fmt: str) -> str:
    icfg = cfg.ingest
    fingerprints = [cache.file_fingerprint(f) for f in files]
    return cache.content_key(STAGE, INGEST_VERSION, fingerprints, fmt, icfg.clean_text, icfg.max_image_pixels)


def run_ingest(cfg: RunConfig) -> cache.StageOutput:
    """Read, validate and store ``cfg.ingest.manifest``; cached by the inputs' fingerprints + config."""
    icfg = cfg.ingest
    if not icfg.manifest:
        raise IngestError("ingest.manifest is empty: pass --manifest FILE (or set ingest.manifest)")
    files = expand_inputs(icfg.manifest)
    if not files:
        raise IngestError(f"ingest.manifest: no files found at {icfg.manifest}")
    fmt = detect_format(icfg.manifest, files, icfg.format)
    key = ingest_key(cfg, files, fmt)
    uri = cache.stage_uri(cfg.output_dir, STAGE, key)
    if cache.is_complete(uri):
        summary = cache.read_summary(uri)
        if "pairs" in summary:
            print(format_summary(summary) + " [cached]")
        return cache.StageOutput(STAGE, key, uri, cached=True)
    storage.delete_dir(uri)  # leftovers of an interrupted run

    from pacl_ray.stages.runtime import init_ray

    init_ray(cfg.ray)
    records = read_records(icfg.manifest, fmt, files)
    validated = records.map_batches(
        validate_batch, batch_format="pyarrow", batch_size=VALIDATE_BATCH_SIZE,
        fn_kwargs={"max_image_pixels": icfg.max_image_pixels, "clean": icfg.clean_text},
    ).materialize()

    # Driver pass over the small columns only: quarantine rows, duplicate ids, counts.
    verdicts = pa.concat_tables(
        list(validated.select_columns(["id", "source", "reason", "field", "detail", "converted_from", "content_digest"])
             .iter_batches(batch_format="pyarrow", batch_size=None))
    )
    rows = verdicts.to_pylist()
    good = [r for r in rows if r["reason"] is None]
    duplicates = find_duplicates([r["id"] for r in good], [r["source"] for r in good])
    quarantine = [
        {k: r[k] for k in tables.QUARANTINE.names} for r in rows if r["reason"] is not None
    ] + [
        {"id": r["id"], "source": r["source"], "field": "id", "reason": "duplicate_id",
         "detail": f"id {r['id']!r} already used by {duplicates[r['source']]}"}
        for r in good if r["source"] in duplicates
    ]
    counts: dict[str, int] = {}
    for q in quarantine:
        counts[q["reason"]] = counts.get(q["reason"], 0) + 1
    converted: dict[str, int] = {}
    for r in good:
        if r["converted_from"] and r["source"] not in duplicates:
            converted[r["converted_from"]] = converted.get(r["converted_from"], 0) + 1
    n_pairs = len(good) - len(duplicates)
    summary = summarize(counts, n_pairs, converted)
    summary.update(format=fmt, manifest=icfg.manifest)
    kept = [r for r in good if r["source"] not in duplicates]
    summary["content_fingerprint"] = pairs_fingerprint([r["id"] for r in kept], [r["content_digest"] for r in kept])

    storage.write_parquet(pa.Table.from_pylist(quarantine, schema=tables.QUARANTINE), storage.join(uri, "quarantine"))
    print(format_summary(summary))
    if n_pairs == 0:
        storage.write_text(storage.join(uri, "summary.json"), json.dumps(summary, indent=2))
        if icfg.fail_if_all_bad:
            raise IngestError(
                f"{format_summary(summary)}\nevery record of {icfg.manifest} is bad; "
                f"see {storage.join(uri, 'quarantine')}", summary,
            )
        storage.write_parquet(tables.PAIRS.empty_table(), storage.join(uri, "pairs"))
    else:
        validated.map_batches(
            _pairs_only, batch_format="pyarrow", fn_kwargs={"drop_sources": set(duplicates)}
        ).write_parquet(storage.join(uri, "pairs"))
    save_config(cfg, uri)
    cache.mark_complete(uri, summary)
    return cache.StageOutput(STAGE, key, uri, cached=False)


def read_pairs_table(ingest: cache.StageOutput, columns: Optional[list[str]] = None) -> pa.Table:
    """The whole PAIRS table of a finished ingest (driver-side; use Ray Data for big reads)."""
    return storage.read_parquet_dir(ingest.path("pairs"), columns=columns)
