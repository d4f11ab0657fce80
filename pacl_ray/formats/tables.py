"""The tables passed between stages. Each stage writes Parquet with exactly these columns.

Joins between stages use the ``id`` column, a stable string assigned at ingest.

    ingest     -> PAIRS        (one row per valid image-text pair; image bytes inline)
               -> QUARANTINE   (one row per rejected record, with where and why)
    partition  -> SCORES       (scores, top ANPs, calibrated scores, partition at the run's sigma)
    embed      -> FEATURES     (initial backbone image features, frozen text-encoder features)
    cluster    -> LABELS       (factual_label_<K> / emotional_label_<K> for every K)
"""

from __future__ import annotations

import pyarrow as pa

ID = "id"

PAIRS = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # encoded image bytes (JPEG/PNG/...)
        pa.field("image_source", pa.string()),  # where the image came from (path, URI, shard/key)
        pa.field("width", pa.int32()),  # displayed (upright) size of the stored image
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),  # displayed size as given; > width/height when ingest
        pa.field("original_height", pa.int32()),  # resized it (ingest.max_image_side), else equal
        pa.field("converted_from", pa.string()),  # original PIL mode when converted to RGB, else null
        pa.field("text_raw", pa.string(), nullable=False),  # the post text exactly as given
        pa.field("text", pa.string(), nullable=False),  # cleaned text (see pacl_ray.core.text)
        pa.field("anps", pa.string()),  # optional precomputed ANPs, "; "-separated
        pa.field("factual_score", pa.float32()),  # optional precomputed scores
        pa.field("emotional_score", pa.float32()),
        pa.field("label", pa.string()),  # optional annotation (e.g. TumEmo emotion_label); never trained on
        pa.field("source", pa.string(), nullable=False),  # manifest file and row, for messages
        pa.field("planted_partition", pa.int8()),  # optional ground-truth code 1-4 (synthetic data)
        pa.field("partition", pa.int8()),  # optional known partition code 1-4, used as given
    ]
)

ORIGINAL_SIZE = ("original_width", "original_height")


def upgrade_pairs(table: pa.Table) -> pa.Table:
    """A PAIRS table written before ``original_width``/``original_height`` existed (ingest version
    2 and older, which never resized) with them added, equal to ``width``/``height``; a current
    table is returned as it is. Raises ValueError naming the missing column when the table has
    neither the original size nor ``width``/``height`` to derive it from."""
    for original, stored in zip(ORIGINAL_SIZE, ("width", "height")):
        if original in table.column_names:
            continue
        if stored not in table.column_names:
            raise ValueError(f"PAIRS table: no column {original!r}, nor {stored!r} to derive it from "
                             f"(columns: {table.column_names})")
        # after width, height (and original_width): where PAIRS has it
        position = 1 + max(table.schema.get_field_index(n) for n in ("width", "height", "original_width")
                           if n in table.column_names)
        table = table.add_column(position, PAIRS.field(original), table.column(stored).cast(pa.int32()))
    return table


QUARANTINE = pa.schema(
    [
        pa.field(ID, pa.string()),
        pa.field("source", pa.string(), nullable=False),  # file and row (or shard and key)
        pa.field("field", pa.string(), nullable=False),  # which field was bad
        pa.field("reason", pa.string(), nullable=False),  # one of QUARANTINE_REASONS
        pa.field("detail", pa.string()),  # the underlying error message
    ]
)

QUARANTINE_REASONS = (
    "missing_file",
    "unreadable_file",
    "corrupt_image",
    "truncated_image",
    "zero_size_image",
    "decompression_bomb",
    "empty_text",
    "undecodable_text",
    "duplicate_id",
    "missing_field",
    "bad_value",  # a value of the right type that is not allowed (score "high", partition 7, NaN)
    "wrong_type",  # a value of the wrong type (text 123, id true, anps {...}): the detail names found and expected
    "malformed_record",  # a record that cannot be parsed (cut-off JSON line, CSV row with the wrong field count, truncated tar member)
)

SCORES = pa.schema(
    [
        pa.field(ID, pa.string(), nullable=False),
        pa.field("factual_score", pa.float32(), nullable=False),  # raw CLIP cosine
        pa.field("emotional_score", pa.float32(), nullable=False),  # raw sentiment-encoder cosine
        pa.field("anps", pa.string()),  # the ANPs used (top-k joined by "; ")
        pa.field("factual_calibrated", pa.float32(), nullable=False),
        pa.field("emotional_calibrated", pa.float32(), nullable=False),
        pa.field("partition", pa.int8(), nullable=False),  # 1-4 at the run's sigma
    ]
)


def features_schema(image_dim: int, text_dim: int, dtype: pa.DataType = pa.float32()) -> pa.Schema:
    """FEATURES: fixed-size list columns so readers know the width without scanning."""
    return pa.schema(
        [
            pa.field(ID, pa.string(), nullable=False),
            pa.field("image_feature", pa.list_(dtype, image_dim), nullable=False),
            pa.field("text_feature", pa.list_(dtype, text_dim), nullable=False),
        ]
    )


def factual_label_column(k: int) -> str:
    return f"factual_label_{k}"


def emotional_label_column(k: int) -> str:
    return f"emotional_label_{k}"


def labels_schema(ks: list[int]) -> pa.Schema:
    """LABELS: the pseudo-labels of every K of a sweep, one int32 column per K and modality."""
    fields = [pa.field(ID, pa.string(), nullable=False)]
    for k in ks:
        fields.append(pa.field(factual_label_column(k), pa.int32(), nullable=False))
        fields.append(pa.field(emotional_label_column(k), pa.int32(), nullable=False))
    return pa.schema(fields)
