"""Stage 1b (paper 3.1): partitions of the stored scores at a sigma (stage ``partition``).

:func:`run_partition` calibrates the raw scores of the ``scores`` stage
(:mod:`pacl_ray.stages.scoring`), thresholds them (:func:`pacl_ray.core.partitions.assign_partitions`),
writes :data:`tables.SCORES` under ``scores/`` and a report (``report.json``, ``histograms.png``,
``gallery.html``) and prints the split. It never runs a model, so a sigma sweep re-runs only this.
A partition code given in the manifest (``partition`` column, validated 1-4 at ingest) is used as
given; only the other pairs are thresholded.
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Optional

import numpy as np
import pyarrow as pa

from pacl_ray.config import PartitionConfig, RunConfig, partition_args, thresholds
from pacl_ray.core.partitions import (
    PARTITION_NAMES,
    assign_partitions,
    calibrated_scores,
    confusion_matrix,
    partition_counts,
)
from pacl_ray.formats import storage, tables
from pacl_ray.stages import cache
from pacl_ray.stages.scoring import read_raw_scores

PARTITION_STAGE = "partition"
PARTITION_VERSION = 2
PARTITION_CODES = tuple(PARTITION_NAMES)  # the codes 1-4, from core.partitions


# --------------------------------------------------------------------------- thresholds and report


def partition_key(cfg: RunConfig, scores: cache.StageOutput) -> str:
    p = cfg.partition
    return cache.content_key(
        PARTITION_STAGE, PARTITION_VERSION, scores.key, p.factual_calibration, p.emotional_calibration,
        thresholds(p), p.report_examples, cfg.seed, p.use_scores,
    )


def scores_table(raw: pa.Table, pcfg: PartitionConfig) -> pa.Table:
    """RAW_SCORES -> :data:`tables.SCORES` (calibrated scores and partition at the config's sigma;
    a ``partition`` code given in the manifest is kept as given). Pairs with a given code may have
    NaN scores; calibration (e.g. ``rank``) is computed over the scored pairs only."""
    factual = raw.column("factual_score").to_numpy(zero_copy_only=False).astype(np.float32)
    emotional = raw.column("emotional_score").to_numpy(zero_copy_only=False).astype(np.float32)
    given = given_partitions(raw)
    scored = given == 0
    factual_cal = np.full(factual.shape, np.nan, np.float64)
    emotional_cal = np.full(emotional.shape, np.nan, np.float64)
    codes = given.astype(np.int8)
    if scored.any():
        factual_cal[scored], emotional_cal[scored] = calibrated_scores(
            factual[scored], emotional[scored], pcfg.factual_calibration, pcfg.emotional_calibration)
        codes[scored] = assign_partitions(factual[scored], emotional[scored], **partition_args(pcfg))
    return pa.Table.from_arrays(
        [
            raw.column("id"), pa.array(factual), pa.array(emotional), raw.column("anps"),
            pa.array(factual_cal.astype(np.float32)), pa.array(emotional_cal.astype(np.float32)),
            pa.array(codes, pa.int8()),
        ],
        schema=tables.SCORES,
    )


def given_partitions(raw: pa.Table) -> np.ndarray:
    """int8 [N]: the partition code given in the manifest per pair, 0 where none was given."""
    if "partition" not in raw.column_names:
        return np.zeros(raw.num_rows, np.int8)
    return raw.column("partition").fill_null(0).to_numpy(zero_copy_only=False).astype(np.int8)


def split_report(codes: np.ndarray, pcfg: PartitionConfig, planted: Optional[np.ndarray] = None) -> dict:
    """Counts and percentages per partition, thresholds, and planted-vs-assigned agreement
    (``planted`` [N]: ground-truth codes, anything outside 1-4 meaning unknown)."""
    counts = partition_counts(codes)
    total = int(codes.size)
    sigma_f, sigma_e = thresholds(pcfg)
    report: dict = {
        "pairs": total,
        "sigma_factual": sigma_f, "sigma_emotional": sigma_e,
        "factual_calibration": pcfg.factual_calibration,
        "emotional_calibration": pcfg.emotional_calibration,
        "partitions": {
            str(code): {
                "name": PARTITION_NAMES[code], "count": n,
                "percent": round(100.0 * n / total, 2) if total else 0.0,
            }
            for code, n in counts.items()
        },
    }
    if planted is not None:
        known = np.isin(planted, PARTITION_CODES)
        if known.any():
            matrix = confusion_matrix(planted[known].astype(int), codes[known])
            report["planted_agreement"] = {
                "pairs": int(known.sum()),
                "accuracy": round(float(np.trace(matrix) / matrix.sum()), 4),
                "confusion_matrix": matrix.tolist(),  # rows planted 1-4, columns assigned 1-4
            }
    return report


def format_split(report: dict) -> str:
    lines = [
        f"partition: {report['pairs']} pairs; factual > {report['sigma_factual']:g} "
        f"({report['factual_calibration']}), emotional > {report['sigma_emotional']:g} "
        f"({report['emotional_calibration']})"
    ]
    if report.get("given_partitions"):
        lines.append(f"  {report['given_partitions']} pairs with a partition given in the manifest (used as given)")
    for code, entry in report["partitions"].items():
        lines.append(f"  {code} {entry['name']:<26} {entry['count']:>8}  {entry['percent']:6.2f}%")
    agreement = report.get("planted_agreement")
    if agreement:
        lines.append(f"  planted vs assigned: accuracy {agreement['accuracy']:.4f} over {agreement['pairs']} pairs")
        lines.append("  confusion (rows planted 1-4, columns assigned 1-4):")
        lines += ["    " + " ".join(f"{n:>7}" for n in row) for row in agreement["confusion_matrix"]]
    return "\n".join(lines)


def raw_threshold(raw: np.ndarray, calibrated: np.ndarray, sigma: float) -> Optional[float]:
    """The raw score where the (monotone) calibration crosses ``sigma``: midway between the highest
    raw score calibrated at or below sigma and the lowest one above it; None when every pair
    falls on one side."""
    below, above = raw[calibrated <= sigma], raw[calibrated > sigma]
    if not len(below) or not len(above):
        return None
    return float((below.max() + above.min()) / 2)


def plot_histograms(table: pa.Table, pcfg: PartitionConfig) -> bytes:
    """PNG of the raw score histograms (cosine similarities) with each threshold marked where the
    calibration puts sigma on the raw scale, plus the calibrated histograms for calibrations that
    are not rank-based (a rank-calibrated histogram is flat by construction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigma_f, sigma_e = thresholds(pcfg)
    panels = [
        ("factual_score", "factual_calibrated", "factual (raw cosine)", sigma_f, True),
        ("emotional_score", "emotional_calibrated", "emotional (raw cosine)", sigma_e, True),
    ]
    for calibration, (raw, calibrated, name, sigma) in (
            (pcfg.factual_calibration, ("factual_score", "factual_calibrated", "factual", sigma_f)),
            (pcfg.emotional_calibration, ("emotional_score", "emotional_calibrated", "emotional", sigma_e))):
        if calibration != "rank":
            panels.append((calibrated, calibrated, f"{name} ({calibration})", sigma, False))
    rows = 1 if len(panels) == 2 else 2
    fig, axes = plt.subplots(rows, 2, figsize=(10, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.remove()
    for ax, (column, calibrated, title, sigma, on_raw) in zip(axes.flat, panels):
        values = table.column(column).to_numpy()
        finite = np.isfinite(values)  # pairs with a given partition have no scores (NaN)
        ax.hist(values[finite], bins=50, color="#4c72b0")
        line = raw_threshold(values[finite], table.column(calibrated).to_numpy()[finite], sigma) if on_raw else sigma
        if line is not None:
            label = f"sigma = {sigma:g}" + (f" (raw {line:.3f})" if on_raw else "")
            ax.axvline(line, color="#c44e52", linestyle="--", label=label)
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("score")
        ax.set_ylabel("pairs")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _thumbnail_base64(data: bytes, size: int = 160) -> str:
    """A JPEG of the image fitted to ``size`` px on its long side: small images (a 32 px world) are
    upscaled with nearest-neighbour sampling, so their pixels stay visible rather than blurred."""
    from PIL import Image

    from pacl_ray.formats.images import decode_rgb

    image = decode_rgb(data, min_side=size)  # shorter side >= size: the longer one is too
    scale = size / max(image.size)
    if scale > 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.NEAREST)
    else:
        image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def gallery_html(table: pa.Table, pairs: pa.Table, report: dict) -> str:
    """A small self-contained HTML page: example pairs per partition (like the paper's Fig. 3)."""
    by_id = {r["id"]: r for r in pairs.to_pylist()}
    rows = table.to_pylist()
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>pacl_ray partitions</title>",
        "<style>body{font-family:sans-serif} .pair{display:inline-block;width:200px;vertical-align:top;"
        "margin:6px;font-size:12px} img{max-width:180px}</style></head><body>",
        f"<h1>Partitions of {report['pairs']} pairs</h1>",
        f"<p>factual &gt; {report['sigma_factual']:g} ({html.escape(report['factual_calibration'])}), "
        f"emotional &gt; {report['sigma_emotional']:g} ({html.escape(report['emotional_calibration'])})</p>",
    ]
    for code, entry in report["partitions"].items():
        parts.append(f"<h2>{code}. {html.escape(entry['name'])}: {entry['count']} ({entry['percent']}%)</h2>")
        for r in rows:
            if r["partition"] != int(code) or r["id"] not in by_id:
                continue
            pair = by_id[r["id"]]
            parts.append(
                f"<div class='pair'><img src='data:image/jpeg;base64,{_thumbnail_base64(pair['image'])}'>"
                f"<br><b>{html.escape(pair['text'])}</b><br>ANPs: {html.escape(r['anps'] or '')}"
                f"<br>factual {r['factual_score']:.3f} ({r['factual_calibrated']:.3f}), "
                f"emotional {r['emotional_score']:.3f} ({r['emotional_calibrated']:.3f})</div>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def _gallery_examples(table: pa.Table, per_partition: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    codes = table.column("partition").to_numpy()
    picks = []
    for code in PARTITION_NAMES:
        rows = np.flatnonzero(codes == code)
        picks.extend(rng.choice(rows, size=min(per_partition, rows.size), replace=False).tolist())
    return table.take(pa.array(sorted(picks), pa.int64()))


def run_partition(cfg: RunConfig, scores: cache.StageOutput) -> cache.StageOutput:
    """Threshold stored scores at the configured sigma(s); never runs a model (cached)."""
    import pyarrow.compute as pc

    pcfg = cfg.partition

    def build(uri: str) -> dict:
        raw = read_raw_scores(scores)
        table = scores_table(raw, pcfg)
        codes = table.column("partition").to_numpy()
        planted = raw.column("planted_partition").fill_null(0).to_numpy()
        report = split_report(codes, pcfg, planted)
        report["given_partitions"] = int(np.count_nonzero(given_partitions(raw)))
        storage.write_parquet(table, storage.join(uri, "scores"))
        storage.write_bytes(storage.join(uri, "histograms.png"), plot_histograms(table, pcfg))
        examples = _gallery_examples(table, pcfg.report_examples, cfg.seed)
        ingest_uri = cache.read_summary(scores.uri).get("ingest_uri")
        if ingest_uri and examples.num_rows:
            pairs = storage.read_parquet_dir(
                storage.join(ingest_uri, "pairs"), columns=["id", "image", "text"],
                filter_expr=pc.field("id").isin(examples.column("id")),
            )
            storage.write_text(storage.join(uri, "gallery.html"), gallery_html(examples, pairs, report))
        storage.write_text(storage.join(uri, "report.json"), json.dumps(report, indent=2))
        return report

    return cache.run_cached(cfg.output_dir, PARTITION_STAGE, partition_key(cfg, scores), build, config=cfg,
                            describe=format_split)


def read_scores(partition: cache.StageOutput, columns: list[str] | None = None) -> pa.Table:
    """The :data:`tables.SCORES` table of a finished partition stage (checked against its record;
    ``columns`` projects it)."""
    table = cache.read_table(partition, "scores", columns=columns)
    return table.cast(pa.schema([tables.SCORES.field(c) for c in table.column_names]))
