"""Stage 0: image-text manifests into one validated Parquet table, bad records quarantined.

Inputs (``cfg.ingest.manifest``; ``cfg.ingest.format`` = auto picks by suffix / folder contents):
a JSONL, CSV/TSV or Parquet manifest (or a folder or glob of them), WebDataset tar shards, or the
TumEmo layout. The accepted forms and columns are listed in :mod:`pacl_ray.formats.manifests`
(Parquet may hold the image bytes inline). Hidden and system files (``.DS_Store``, ``._*``,
``__MACOSX/``) in a folder are ignored.

Work is per file and per record, in Ray tasks; the driver holds nothing per row:

1. one read task per input file (:func:`pacl_ray.formats.manifests.read_file`) numbers its rows
   and turns each fault (bad UTF-8, a cut-off line, a malformed CSV row, ...) into a verdict for
   that record only;
2. ``map_batches`` validation reads and decodes each image with the shared decoder
   (:mod:`pacl_ray.formats.images`: EXIF orientation applied, every mode scaled to 8-bit RGB),
   with ``ingest.max_image_side`` set resizes it there (:func:`pacl_ray.formats.images.store`:
   longer side at most that, aspect ratio kept, draft-mode JPEG decode + Lanczos, stored as JPEG;
   the original size goes to ``original_width``/``original_height``), and decodes and cleans the
   text;
3. duplicate ids: one task reads the validated blocks (by reference, one at a time) and finds,
   per id, its first occurrence by (file, row) and how often it occurs (about 30 bytes per row,
   in that task); only ids seen twice or more are passed on, as an object reference, to the
   tasks that drop the later occurrences.

Outputs under ``{output_dir}/stages/ingest/{key}``: ``pairs/`` (:data:`tables.PAIRS`, image bytes
inline), ``quarantine/`` (:data:`tables.QUARANTINE`: id, ``file:row`` source, field, reason,
detail), ``config.yaml`` and ``_SUCCESS`` with the counts per reason; the quarantine's published
path is printed after the summary. If every record is bad, :class:`IngestError` is raised with that
summary, nothing is published, and the quarantine is kept in ``stages/ingest/{key}.failed/``
(named in the error; deleted by the next successful run of the same inputs). A whole-file problem
(a CSV header or Parquet schema without ``image``/``text``, a Parquet column of the wrong type) is
one :class:`IngestError` naming the file, raised before any row is read or anything written; so
is input without a single record (``no records in ...``: empty files, a CSV header alone).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import posixpath
from typing import Callable, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pacl_ray.stages import cache
from pacl_ray.formats import images, manifests, tables
from pacl_ray.formats import storage
from pacl_ray.formats.manifests import RECORD, Rejected
from pacl_ray.config import RunConfig
from pacl_ray.core.text import clean_text

STAGE = "ingest"
INGEST_VERSION = 5  # bump when validation changes what a given input produces (3: original size columns; 4: wrong_type, empty CSV cells; 5: image fault reasons and details)
FORMATS = ("jsonl", "csv", "parquet", "webdataset", "tumemo")
IMAGE_SUFFIXES = manifests.IMAGE_SUFFIXES
MANIFEST_SUFFIXES = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet",
}
VALIDATE_BATCH_SIZE = 64
BLOCK_ROWS = 1024  # records per block between reading and validation (one validation task each)

# Validated records: PAIRS columns (nullable, since bad rows have no image), position, verdict.
VALIDATED = pa.schema(
    [f.with_nullable(True) for f in tables.PAIRS]
    + [pa.field("position", pa.int64()), pa.field("reason", pa.string()), pa.field("field", pa.string()),
       pa.field("detail", pa.string()),
       pa.field("content_digest", pa.string())]  # of id, image and text: the pairs' content fingerprint
)


class IngestError(RuntimeError):
    """Ingest cannot produce a usable table (no input, or every record is bad)."""

    def __init__(self, message: str, summary: Optional[dict] = None):
        super().__init__(message)
        self.summary = summary or {}


# --------------------------------------------------------------------------- validation (pure)


def read_image_file(uri: str) -> bytes:
    """The bytes of an image file; :class:`Rejected` (missing/unreadable_file) when it cannot be read."""
    try:
        return images.read_image_bytes(uri)
    except images.ImageRejected as err:
        raise Rejected(err.reason, "image", err.detail) from err


def store_image(data: bytes, max_image_pixels: int, max_image_side: int = 0) -> images.StoredImage:
    """Validate encoded image bytes -> what to store (:class:`pacl_ray.formats.images.StoredImage`).

    See :func:`pacl_ray.formats.images.store`: an image whose longer side exceeds
    ``max_image_side`` (0 = no limit) is resized to it and stored as JPEG; otherwise upright
    single-frame RGB keeps its bytes, and other modes, EXIF-rotated and animated images are
    decoded (scaled to 8-bit RGB, turned upright, first frame) and re-encoded. Raises
    :class:`Rejected` with zero_size_image, decompression_bomb (limit ``max_image_pixels``;
    0 disables), corrupt_image or truncated_image.
    """
    try:
        return images.store(data, max_image_pixels, max_image_side)
    except images.ImageRejected as err:
        detail = err.detail
        if err.reason == "decompression_bomb":  # the limit is ours: name the key that sets it
            detail += "; the limit is ingest.max_image_pixels (raise it, or 0 for no limit, to accept the image)"
        raise Rejected(err.reason, "image", detail) from err


def check_image(data: bytes, max_image_pixels: int) -> tuple[bytes, int, int, Optional[str]]:
    """:func:`store_image` at the image's own size -> (bytes to store, displayed width, height,
    original mode or None)."""
    kept = store_image(data, max_image_pixels)
    return kept.data, kept.width, kept.height, kept.converted_from


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


def validate_record(record: dict, max_image_pixels: int, clean: bool, max_image_side: int = 0) -> dict:
    """One normalised record (:data:`manifests.RECORD`) -> one validated row (:data:`VALIDATED`);
    ``max_image_side``: see :func:`store_image`."""
    out = {
        "id": record["id"], "source": record["source"], "position": record["position"],
        "image_source": record["image_name"], "anps": record["anps"],
        "factual_score": record["factual_score"], "emotional_score": record["emotional_score"],
        "label": record["label"], "planted_partition": record["planted_partition"], "partition": record["partition"],
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
        kept = store_image(data, max_image_pixels, max_image_side)
    except Rejected as bad:
        out.update(reason=bad.reason, field=bad.field, detail=bad.detail)
        return out
    out.update(
        image=kept.data, width=kept.width, height=kept.height, original_width=kept.original_width,
        original_height=kept.original_height, converted_from=kept.converted_from,
        text_raw=text_raw, text=cleaned, content_digest=content_digest(record["id"], kept.data, cleaned),
    )
    return out


def content_digest(pair_id: str, image: bytes, text: str) -> str:
    """One pair's identity for the upstream stages: SHA-256 of its id, stored image bytes and
    cleaned text (what embedding and clustering read), not of its scores or partition."""
    digest = hashlib.sha256()
    for part in (pair_id.encode("utf-8"), hashlib.sha256(image).digest(), text.encode("utf-8")):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


FINGERPRINT_BITS = 128


def fingerprint_tally(batch: pa.Table) -> pa.Table:
    """Ray Data UDF over kept pairs: (rows, sum of their content digests mod 2^128) of one block,
    an order-independent part of :func:`pairs_fingerprint` (the driver adds one row per block)."""
    total = sum(int(d[: FINGERPRINT_BITS // 4], 16) for d in batch.column("content_digest").to_pylist())
    return pa.table({"n": [batch.num_rows], "digest_sum": [str(total % (1 << FINGERPRINT_BITS))]})


def pairs_fingerprint(tallies: Iterable[dict]) -> str:
    """Order-independent fingerprint of the stored pairs' ids, images and texts (the summary's
    ``content_fingerprint``): embed and pseudo-labels are keyed by it, so a manifest that changes
    only scores or partitions re-runs only scoring and partitioning."""
    n, total = 0, 0
    for row in tallies:
        n, total = n + int(row["n"]), (total + int(row["digest_sum"])) % (1 << FINGERPRINT_BITS)
    return cache.content_key("pairs-content", n, f"{total:032x}")


def validate_batch(batch: pa.Table, max_image_pixels: int, clean: bool, max_image_side: int = 0) -> pa.Table:
    """Ray Data UDF: normalised records -> validated rows (bad rows carry reason/field/detail);
    images are resized here, in the ingest workers, when ``max_image_side`` is set."""
    rows = [validate_record(r, max_image_pixels, clean, max_image_side) for r in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=VALIDATED)


# --------------------------------------------------------------------------- duplicate ids (per batch)

INDEX_SCHEMA = pa.schema([("id", pa.string()), ("first_position", pa.int64()), ("first_source", pa.string())])


def index_duplicates(blocks: Callable[[], Iterable[pa.Table]]) -> pa.Table:
    """Ids that occur more than once among valid validated rows -> :data:`INDEX_SCHEMA` rows
    (the id, and position and source of its first occurrence by (file, row)).

    ``blocks()`` yields the validated blocks; it is called twice (ids, then the first
    occurrences' sources) so that only one block at a time is held. Memory: about 30 bytes
    per valid row (id and position), in the one task that runs this.
    """
    # An empty block may carry no schema at all (Ray Data's output for no rows): skip it.
    keys = [b.filter(pc.is_null(b.column("reason"))).select(["id", "position"]) for b in blocks() if b.num_rows]
    keys = [k for k in keys if k.num_rows]
    if not keys:
        return INDEX_SCHEMA.empty_table()
    grouped = pa.concat_tables(keys).group_by("id").aggregate([("position", "min"), ("position", "count")])
    del keys
    repeated = grouped.filter(pc.greater(grouped.column("position_count"), 1))
    firsts = repeated.column("position_min").combine_chunks()
    if not len(firsts):
        return INDEX_SCHEMA.empty_table()
    hits = [b.filter(pc.is_in(b.column("position"), value_set=firsts)).select(["position", "source"])
            for b in blocks() if b.num_rows]
    hits = pa.concat_tables(hits).combine_chunks()
    sources = pc.take(hits.column("source"), pc.index_in(firsts, value_set=hits.column("position")))
    return pa.table([repeated.column("id").cast(pa.string()), firsts, sources], schema=INDEX_SCHEMA)


def index_duplicates_task(block_refs: list) -> pa.Table:
    """Ray task: :func:`index_duplicates` over validated blocks given as object references
    (nested in a list, so Ray does not fetch them all at once)."""
    import ray

    return index_duplicates(lambda: (ray.get(ref) for ref in block_refs))


def _index_table(index) -> pa.Table:
    """The duplicate index, fetched from the object store inside a task when given as a reference."""
    if isinstance(index, pa.Table):
        return index
    import ray

    return ray.get(index)


def _duplicate_mask(batch: pa.Table, index: pa.Table) -> tuple[pa.Array, pa.Array]:
    """(mask of valid rows that repeat an earlier id, index row of each row's id or null)."""
    where = pc.index_in(batch.column("id"), value_set=index.column("id"))
    first = pc.take(index.column("first_position"), pc.fill_null(where, 0)) if index.num_rows else pa.nulls(batch.num_rows, pa.int64())
    later = pc.and_(pc.is_valid(where), pc.not_equal(batch.column("position"), first))
    mask = pc.fill_null(pc.and_(pc.is_null(batch.column("reason")), later), False)
    return mask, where


def duplicate_rows(batch: pa.Table, index) -> pa.Table:
    """Valid rows whose id occurred earlier -> QUARANTINE rows (duplicate_id) + converted_from.
    ``index``: :func:`index_duplicates` rows, or an ObjectRef of them."""
    index = _index_table(index)
    mask, where = _duplicate_mask(batch, index)
    dups = batch.filter(mask)
    firsts = pc.take(index.column("first_source"), where.filter(mask)).to_pylist() if dups.num_rows else []
    details = [f"id {i!r} already used by {f}" for i, f in zip(dups.column("id").to_pylist(), firsts)]
    n = dups.num_rows
    return pa.table({
        "id": dups.column("id"), "source": dups.column("source"),
        "field": pa.array(["id"] * n, pa.string()), "reason": pa.array(["duplicate_id"] * n, pa.string()),
        "detail": pa.array(details, pa.string()), "converted_from": dups.column("converted_from"),
    })


def pairs_only(batch: pa.Table, index, with_digest: bool = False) -> pa.Table:
    """Valid rows that are not a later duplicate of an id, as :data:`tables.PAIRS` (plus
    ``content_digest`` when ``with_digest``)."""
    mask, _ = _duplicate_mask(batch, _index_table(index))
    keep = pc.and_(pc.is_null(batch.column("reason")), pc.invert(mask))
    pairs = batch.filter(keep)
    out = pairs.select(tables.PAIRS.names).cast(tables.PAIRS)
    return out.append_column("content_digest", pairs.column("content_digest")) if with_digest else out


def quarantined_only(batch: pa.Table) -> pa.Table:
    """Rows with a verdict, as :data:`tables.QUARANTINE`."""
    return batch.filter(pc.is_valid(batch.column("reason"))).select(tables.QUARANTINE.names).cast(tables.QUARANTINE)


def tally(batch: pa.Table) -> pa.Table:
    """Per-block counts of (reason or "", converted_from of valid rows or "") -> n."""
    reason = pc.fill_null(batch.column("reason"), "")
    converted = pc.if_else(pc.is_null(batch.column("reason")), pc.fill_null(batch.column("converted_from"), ""), "")
    small = pa.table({"reason": reason, "converted": converted, "n": pa.array(np.ones(batch.num_rows, np.int64))})
    grouped = small.group_by(["reason", "converted"]).aggregate([("n", "sum")])
    return pa.table({"reason": grouped["reason"], "converted": grouped["converted"], "n": grouped["n_sum"]})


# --------------------------------------------------------------------------- inputs


def _has_glob(uri: str) -> bool:
    return any(ch in uri for ch in "*?[")


def _visible(files: list[str], base: str) -> list[str]:
    """Drop hidden and system files (``.DS_Store``, ``._x.jpg``, ``__MACOSX/``) below ``base``."""
    base = storage.normalize(base).rstrip("/") + "/"
    return [f for f in files if not manifests.is_hidden(f[len(base):] if f.startswith(base) else posixpath.basename(f))]


def expand_inputs(manifest: str) -> list[str]:
    """The input files of a manifest path: the file itself, a folder's files, or a glob's matches
    (hidden and system files skipped)."""
    if _has_glob(manifest):
        base = manifest
        while _has_glob(base):
            base = base.rsplit("/", 1)[0]
        pattern = storage.normalize(manifest)
        return _visible([f for f in storage.list_files(base) if fnmatch.fnmatch(f, pattern)], base)
    fs, path = storage.resolve(manifest)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise IngestError(f"ingest.manifest: {manifest} does not exist")
    if info.type == pafs.FileType.Directory:
        return _visible(storage.list_files(manifest), manifest)
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


def plan_reads(manifest: str, fmt: str, files: list[str]) -> tuple[list[tuple[str, str]], dict, list[dict]]:
    """(file, reader kind) per input file, TumEmo's {id: image file}, and records found by the
    listing alone (TumEmo images without a text)."""
    if fmt in ("jsonl", "csv", "parquet"):
        wanted = [f for f in files if MANIFEST_SUFFIXES.get(_suffix(f)) == fmt] or files
        kind = {"jsonl": "jsonl", "parquet": "parquet"}
        return [(f, kind.get(fmt, "tsv" if _suffix(f) == ".tsv" else "csv")) for f in wanted], {}, []
    if fmt == "webdataset":
        shards = [f for f in files if _suffix(f) == ".tar"]
        if not shards:
            raise IngestError(f"ingest.manifest: no .tar shards in {manifest}")
        return [(f, "webdataset") for f in shards], {}, []
    if fmt != "tumemo":
        raise IngestError(f"unknown format {fmt!r}")
    stems = lambda f: posixpath.splitext(posixpath.basename(f))[0]  # noqa: E731
    image_files = {}
    for f in files:
        if _suffix(f).lstrip(".") in IMAGE_SUFFIXES:
            image_files.setdefault(stems(f), f)
    json_lists = [f for f in files if _suffix(f) in (".json", ".jsonl")]
    if json_lists:
        return [(f, "tumemo_json") for f in json_lists], image_files, []
    texts = [f for f in files if _suffix(f) == ".txt"]
    if not texts:
        raise IngestError(f"ingest.manifest: TumEmo folder {manifest} has neither a JSON list nor .txt files")
    text_ids = {stems(f) for f in texts}
    orphans = []
    for index, (stem, uri) in enumerate(sorted(image_files.items()), start=len(texts)):
        if stem not in text_ids:
            record = manifests.blank_record(uri, index << manifests.ROW_BITS)
            record.update(id=stem, image_ref=uri, image_name=uri, reason="missing_field",
                          field="text", detail=f"no text file for id {stem!r}")
            orphans.append(record)
    return [(f, "tumemo_text") for f in texts], image_files, orphans


def read_files(batch: dict, images: dict, batch_rows: int):
    """Ray Data UDF (one input file per call): yields its :data:`manifests.RECORD` tables."""
    for uri, kind, index in zip(batch["uri"], batch["kind"], batch["file_index"]):
        yield from manifests.read_file(str(uri), str(kind), int(index), images, batch_rows)


def read_records(manifest: str, fmt: str, files: list[str]):
    """A Ray Dataset of normalised :data:`manifests.RECORD` rows for any supported input format:
    one read task per file, then blocks of :data:`BLOCK_ROWS` records for validation."""
    import ray

    reads, image_files, orphans = plan_reads(manifest, fmt, files)
    items = [{"uri": uri, "kind": kind, "file_index": i} for i, (uri, kind) in enumerate(reads)]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_files, batch_size=1, batch_format="numpy",
        fn_kwargs={"images": image_files, "batch_rows": BLOCK_ROWS},
    )
    if orphans:
        ds = ds.union(ray.data.from_arrow(pa.Table.from_pylist(orphans, schema=RECORD)))
    return ds.repartition(target_num_rows_per_block=BLOCK_ROWS)


# --------------------------------------------------------------------------- outcomes and outputs


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


def find_duplicates(validated):
    """(ObjectRef of the duplicate index table, materialized Dataset of duplicate_id rows).

    One task builds the index (:func:`index_duplicates`) from the validated blocks' references;
    the driver holds references only, never per-row data. (Ray Data's groupby would return
    blocks of (id, position) small enough to be kept in the driver's own memory store.)
    """
    import ray

    index = ray.remote(index_duplicates_task).remote(validated.to_arrow_refs())
    duplicates = validated.map_batches(duplicate_rows, batch_format="pyarrow", fn_kwargs={"index": index}).materialize()
    return index, duplicates


def count_outcomes(validated, duplicates) -> tuple[dict, dict, int]:
    """({reason: n}, {converted mode: n}, kept pairs) over validated rows and duplicates.

    Each block is tallied where it lives (:func:`tally`); one task sums the tallies, so the
    driver receives only the totals."""
    import ray

    tallies = validated.map_batches(tally, batch_format="pyarrow").materialize()
    dup_tallies = duplicates.map_batches(tally_duplicates, batch_format="pyarrow").materialize()
    totals = ray.get(ray.remote(sum_tallies).remote(len(tallies.to_arrow_refs()), *tallies.to_arrow_refs(),
                                                    *dup_tallies.to_arrow_refs()))
    counts: dict[str, int] = {}
    converted: dict[str, int] = {}
    valid = 0
    for row in totals["verdicts"]:
        if row["reason"]:
            counts[row["reason"]] = counts.get(row["reason"], 0) + row["n"]
        else:
            valid += row["n"]
            if row["converted"]:
                converted[row["converted"]] = converted.get(row["converted"], 0) + row["n"]
    for row in totals["duplicates"]:
        counts["duplicate_id"] = counts.get("duplicate_id", 0) + row["n"]
        valid -= row["n"]
        if row["converted"]:
            converted[row["converted"]] -= row["n"]
    return counts, {m: n for m, n in converted.items() if n}, valid


def tally_duplicates(batch: pa.Table) -> pa.Table:
    """Per-block counts of duplicate rows by converted_from ("" when not converted)."""
    small = pa.table({"converted": pc.fill_null(batch.column("converted_from"), ""),
                      "n": pa.array(np.ones(batch.num_rows, np.int64))})
    grouped = small.group_by(["converted"]).aggregate([("n", "sum")])
    return pa.table({"converted": grouped["converted"], "n": grouped["n_sum"]})


def sum_tallies(n_verdicts: int, *parts: pa.Table) -> dict:
    """The first ``n_verdicts`` parts are :func:`tally` tables, the rest :func:`tally_duplicates`
    tables -> {"verdicts": [...], "duplicates": [...]} summed rows (run as a Ray task)."""
    def total(tables_: list, keys: list[str]) -> list[dict]:
        tables_ = [t for t in tables_ if t.num_rows]
        if not tables_:
            return []
        grouped = pa.concat_tables(tables_).group_by(keys).aggregate([("n", "sum")])
        return [dict(row, n=row.pop("n_sum")) for row in grouped.to_pylist()]

    return {"verdicts": total(list(parts[:n_verdicts]), ["reason", "converted"]),
            "duplicates": total(list(parts[n_verdicts:]), ["converted"])}


def _write(ds, directory: str) -> None:
    fs, path = storage.resolve(directory)
    ds.write_parquet(path, filesystem=fs)


def ingest_key(cfg: RunConfig, files: list[str], fmt: str) -> str:
    icfg = cfg.ingest
    fingerprints = [cache.file_fingerprint(f) for f in files]
    return cache.content_key(STAGE, INGEST_VERSION, fingerprints, fmt, icfg.clean_text, icfg.max_image_pixels,
                             icfg.max_image_side)


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
    failed = failed_uri(cfg.output_dir, key)
    # A failing build's staging directory is deleted (keep_failed=False); the one table worth
    # keeping from a failed run, the quarantine of a manifest whose every record is bad, is
    # written to ``failed`` instead, and the error names it.
    out = cache.run_cached(
        cfg.output_dir, STAGE, key, lambda uri: _build(cfg, files, fmt, uri, failed), config=cfg,
        describe=format_summary,
    )
    storage.delete_dir(failed)  # an earlier failed run's quarantine of the same inputs is stale now
    if cache.read_summary(out.uri).get("quarantined"):
        print(f"ingest: quarantined records (source file:row, field, reason, detail) are in {out.path('quarantine')}")
    return out


def failed_uri(output_dir: str, key: str) -> str:
    """Where the quarantine of a run that published nothing (every record bad) is kept:
    ``{output_dir}/stages/ingest/{key}.failed`` (not a stage output: no completion record)."""
    return cache.stage_uri(output_dir, STAGE, f"{key}.failed")


def check_headers(reads: list[tuple[str, str]], workers: int = 16) -> None:
    """Check every CSV/TSV header and Parquet schema before any row is read (header and footer
    reads only, in threads): :class:`IngestError` naming the first bad file, its problem, the
    columns found and expected (:func:`pacl_ray.formats.manifests.check_columns`), and how many
    other files have a problem too."""
    from concurrent.futures import ThreadPoolExecutor

    def check(read: tuple[str, str]) -> Optional[str]:
        try:
            manifests.check_header(*read)
        except manifests.ManifestSchemaError as err:
            return str(err)
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = [p for p in pool.map(check, [r for r in reads if r[1] in ("csv", "tsv", "parquet")]) if p]
    if problems:
        more = f" (and {len(problems) - 1} more file(s) with a header or schema problem)" if len(problems) > 1 else ""
        raise IngestError(f"ingest.manifest: {problems[0]}{more}")


def _build(cfg: RunConfig, files: list[str], fmt: str, uri: str, failed: str) -> dict:
    """Ingest's work into the staging directory ``uri``; returns the summary. Headers and schemas
    are checked first (:func:`check_headers`: a whole-file problem stops the run before Ray
    starts and before anything is written), and inputs without a record (empty files, a header
    alone) stop it there too. While it runs, a line at least every
    :data:`pacl_ray.stages.runtime.PROGRESS_INTERVAL_S` seconds says which step runs (each is a
    Ray Data job that reports no count of its own) and how many records are validated."""
    from pacl_ray.stages.runtime import init_ray, watched

    reads, _, orphans = plan_reads(cfg.ingest.manifest, fmt, files)
    check_headers(reads)
    if not orphans and not any(manifests.has_records(*read) for read in reads):
        raise IngestError(f"ingest.manifest: no records in {', '.join(files)}")  # before Ray starts
    init_ray(cfg.ray)
    with watched("[ingest]", unit="records validated",
                 phase=f"reading and validating the records of {len(files)} input file(s)") as watch:
        return _build_steps(cfg, files, fmt, uri, watch.progress, failed)


def _build_steps(cfg: RunConfig, files: list[str], fmt: str, uri: str, progress, failed: str = "") -> dict:
    """:func:`_build`'s steps; each sets ``progress.phase`` (:class:`pacl_ray.stages.runtime.Progress`).
    When every record is bad (and ``ingest.fail_if_all_bad``), the quarantine and summary go to
    ``failed`` (:func:`failed_uri`), not to the staging directory, which is deleted."""
    icfg = cfg.ingest
    records = read_records(icfg.manifest, fmt, files)
    validated = records.map_batches(
        validate_batch, batch_format="pyarrow", batch_size=VALIDATE_BATCH_SIZE,
        fn_kwargs={"max_image_pixels": icfg.max_image_pixels, "clean": icfg.clean_text,
                   "max_image_side": icfg.max_image_side},
    ).materialize()
    n_records = validated.count()  # from the blocks' metadata
    if n_records == 0:  # empty files: stop before the duplicate and tally steps see schema-less blocks
        raise IngestError(f"ingest.manifest: no records in {', '.join(files)}")
    progress.update(n_records)
    progress.phase = "finding duplicate ids"
    index, duplicates = find_duplicates(validated)
    progress.phase = "counting outcomes"
    counts, converted, n_pairs = count_outcomes(validated, duplicates)
    summary = summarize(counts, n_pairs, converted)
    summary.update(format=fmt, manifest=icfg.manifest)

    give_up = n_pairs == 0 and icfg.fail_if_all_bad and bool(failed)
    if give_up:
        storage.delete_dir(failed)
    quarantine_dir = storage.join(failed if give_up else uri, "quarantine")
    storage.write_parquet(tables.QUARANTINE.empty_table(), quarantine_dir)  # a readable table even when none
    if counts:
        progress.phase = f"writing {summary['quarantined']} quarantined records"
        quarantine = validated.map_batches(quarantined_only, batch_format="pyarrow").union(
            duplicates.map_batches(lambda b: b.select(tables.QUARANTINE.names).cast(tables.QUARANTINE), batch_format="pyarrow"))
        _write(quarantine, quarantine_dir)
    if n_pairs == 0:
        storage.write_text(storage.join(failed if give_up else uri, "summary.json"), json.dumps(summary, indent=2))
        if icfg.fail_if_all_bad:
            raise IngestError(
                f"{format_summary(summary)}\nevery record of {icfg.manifest} is bad, so ingest published "
                f"nothing; the quarantine (file:row, field, reason, detail per record) is kept for "
                f"inspection in {quarantine_dir} (set ingest.fail_if_all_bad=false to publish an empty table)",
                summary,
            )
        storage.write_parquet(tables.PAIRS.empty_table(), storage.join(uri, "pairs"))
        summary["content_fingerprint"] = pairs_fingerprint([])
    else:
        # Two passes over the validated blocks (already materialised), none over new copies.
        progress.phase = f"fingerprinting {n_pairs} pairs"
        with_digest = validated.map_batches(pairs_only, batch_format="pyarrow",
                                            fn_kwargs={"index": index, "with_digest": True})
        summary["content_fingerprint"] = pairs_fingerprint(
            with_digest.map_batches(fingerprint_tally, batch_format="pyarrow", batch_size=None).take_all())
        progress.phase = f"writing {n_pairs} pairs"
        _write(validated.map_batches(pairs_only, batch_format="pyarrow", fn_kwargs={"index": index}),
               storage.join(uri, "pairs"))
    return summary


def read_pairs_table(ingest: cache.StageOutput, columns: Optional[list[str]] = None) -> pa.Table:
    """The whole PAIRS table of a finished ingest (driver-side; use Ray Data for big reads). A
    whole table from an older ingest gains ``original_width``/``original_height``
    (:func:`pacl_ray.formats.tables.upgrade_pairs`); asking for those columns by name from one
    raises the cache's StageDataError naming the missing column."""
    table = cache.read_table(ingest, "pairs", columns=columns)
    return tables.upgrade_pairs(table) if columns is None else table
