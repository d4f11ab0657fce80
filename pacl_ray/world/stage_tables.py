"""Synthetic upstream stage tables for tests and benchmarks of Stage 3.

:func:`write_stage_tables` writes the four tables that training reads (ingest ``pairs``,
partition ``scores``, embed ``features``, cluster ``labels`` for K=2) with random images and
features, in the schemas of :mod:`pacl_ray.formats.tables`, and returns them as ``StageOutput``s.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pacl_ray.formats import tables
from pacl_ray.stages.cache import StageOutput

STAGE_TABLES = (("ingest", "pairs"), ("partition", "scores"), ("embed", "features"), ("cluster", "labels"))


def write_stage_tables(root: str | Path, codes: Sequence[int], text_dim: int, seed: int = 0, image_px: int = 40,
                       image_format: str = "PNG", texts: Optional[Sequence[str]] = None) -> dict[str, StageOutput]:
    """Random pairs with partition ``codes`` (shuffled) -> {stage: StageOutput} under ``root``.

    Images are uniform noise [image_px, image_px, 3]; text features float32 [n, text_dim]; factual
    and emotional labels of K=2 are random. ``texts`` (default "t") fill the pairs' text columns.
    """
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    n = len(codes)
    ids = [f"pair-{i:05d}" for i in range(n)]
    images = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (image_px, image_px, 3), dtype=np.uint8)).save(buf, format=image_format)
        images.append(buf.getvalue())
    shuffled = rng.permutation(np.asarray(codes, dtype=np.int8))
    outputs = {}
    for stage, table in STAGE_TABLES:
        os.makedirs(root / stage / table, exist_ok=True)
        outputs[stage] = StageOutput(stage, f"{stage}-key-{seed}", str(root / stage), False)
    text = list(texts) if texts is not None else ["t"] * n
    given = {"id": ids, "image": images, "image_source": ids, "text_raw": text, "text": text, "source": ["m"] * n}
    pq.write_table(pa.table({f.name: given.get(f.name, [None] * n) for f in tables.PAIRS}, schema=tables.PAIRS),
                   root / "ingest" / "pairs" / "part-0.parquet")
    score = rng.random(n).astype(np.float32)
    scores = {"id": ids, "factual_score": score, "emotional_score": score, "factual_calibrated": score,
              "emotional_calibrated": score, "partition": shuffled}
    pq.write_table(pa.table({f.name: scores.get(f.name, [None] * n) for f in tables.SCORES}, schema=tables.SCORES),
                   root / "partition" / "scores" / "part-0.parquet")

    def fixed(width: int) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(n * width).astype(np.float32)), width)

    pq.write_table(pa.table({"id": ids, "image_feature": fixed(8), "text_feature": fixed(text_dim)},
                            schema=tables.features_schema(8, text_dim)), root / "embed" / "features" / "part-0.parquet")
    labels = {"id": ids, "factual_label_2": rng.integers(0, 2, n).astype(np.int32),
              "emotional_label_2": rng.integers(0, 2, n).astype(np.int32)}
    pq.write_table(pa.table(labels, schema=tables.labels_schema([2])), root / "cluster" / "labels" / "part-0.parquet")
    return outputs
