"""Stage 1 (paper 3.1): factual and emotional scores of every pair, then partitions at a sigma.

Two cached stages, so that a sigma sweep never re-runs a model:

* :func:`run_scoring` (stage ``scores``): Ray Data pipeline over the ingest table

      read_parquet(pairs) -> map_batches(preprocess_images)            CPU tasks: decode + resize
                          -> map_batches(ClipScorer, actors)           factual cosine, top-k ANPs
                          -> map_batches(SentimentScorer, actors)      emotional cosine
                          -> write_parquet(raw_scores/)

  Actors load their model once; they ask for ``cfg.partition.num_gpus`` GPUs only when the
  cluster has GPUs, and autocast to bf16/fp16 there. Precomputed ``factual_score`` /
  ``emotional_score`` / ``anps`` columns are used as given, and a model is skipped entirely when
  nothing needs it. Inputs of at most ``ray.in_process_max_rows`` pairs skip the actor pools: the
  same UDFs run in a loop in the calling process (:func:`score_table_locally`), since a pool's
  process starts and model loads would take longer than the scoring itself.
* :func:`run_partition` (stage ``partition``): calibrates the stored scores, thresholds them
  (:func:`pacl_ray.core.partitions.assign_partitions`), writes :data:`tables.SCORES` under ``scores/`` and
  a report (``report.json``, ``histograms.png``, ``gallery.html``) and prints the split.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from pacl_ray.stages import cache
from pacl_ray.core import backbones
from pacl_ray.formats import tables
from pacl_ray.formats import storage
from pacl_ray.config import PartitionConfig, RunConfig, partition_args, save_config, thresholds
from pacl_ray.core.partitions import (
    PARTITION_NAMES,
    assign_partitions,
    calibrated_scores,
    confusion_matrix,
    partition_counts,
)

SCORES_STAGE = "scores"
PARTITION_STAGE = "partition"
SCORES_VERSION = 1
PARTITION_VERSION = 1
DEFAULT_ANP_VOCAB = Path(__file__).resolve().parents[1] / "data" / "anp_vocab.txt"
ANP_PROMPT = "a photo of {}."
ANP_SEPARATOR = "; "  # stored form; tables.PAIRS / SCORES say "; "-separated
SENTIMENT_MAX_LENGTH = 128

RAW_SCORES = pa.schema(
    [
        pa.field(tables.ID, pa.string(), nullable=False),
        pa.field("factual_score", pa.float32(), nullable=False),
        pa.field("emotional_score", pa.float32(), nullable=False),
        pa.field("anps", pa.string()),
        pa.field("planted_partition", pa.int8()),
    ]
)
SCORING_INPUT_COLUMNS = ["id", "image", "text", "anps", "factual_score", "emotional_score", "planted_partition"]


# --------------------------------------------------------------------------- vocabulary and transforms


def load_anp_vocab(path: str = "") -> list[str]:
    """ANPs of a vocabulary file (one per line, '#' comments), in file order without repeats."""
    text = storage.read_text(path) if path else DEFAULT_ANP_VOCAB.read_text(encoding="utf-8")
    anps = [line.strip() for line in text.splitlines()]
    vocab = list(dict.fromkeys(a for a in anps if a and not a.startswith("#")))
    if not vocab:
        raise ValueError(f"partition.anp_vocab: {path or DEFAULT_ANP_VOCAB} has no ANPs")
    return vocab


def clip_eval_transform(model_name: str, pretrained: str = ""):
    """open_clip's eval preprocessing for a model, built from its configs without loading weights,
    so CPU decode tasks do not each hold a copy of the model. PIL image -> float tensor [3, S, S]."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    backbones.register_model_configs()
    model_cfg = open_clip.get_model_config(model_name) or {}
    cfg = merge_preprocess_dict(PreprocessCfg(), model_cfg.get("preprocess_cfg", {}))
    if pretrained:
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(model_name, pretrained))
    size = model_cfg.get("vision_cfg", {}).get("image_size")
    if size:
        cfg["size"] = size
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def preprocess_images(batch: dict, transform) -> dict:
    """CPU stage: encoded image bytes -> ``pixels`` float32 [B, 3, S, S]; drops the bytes."""
    from PIL import Image

    pixels = [
        transform(Image.open(io.BytesIO(data)).convert("RGB")).numpy() for data in batch["image"]
    ]
    out = {k: v for k, v in batch.items() if k != "image"}
    out["pixels"] = np.stack(pixels).astype(np.float32)
    return out


def _missing(values: Any) -> np.ndarray:
    """Bool [B]: which entries of a nullable numpy column are null (None or NaN)."""
    values = np.asarray(values)
    if values.dtype.kind == "f":
        return np.isnan(values)
    if values.dtype.kind != "O":
        return np.zeros(values.shape[0], dtype=bool)
    return np.array([v is None or (isinstance(v, float) and np.isnan(v)) for v in values], dtype=bool)


def _as_float32(values: Any) -> np.ndarray:
    """A nullable numeric numpy column as float32 [B] with NaN for nulls."""
    values = np.asarray(values)
    if values.dtype.kind == "O":
        return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float32)
    return values.astype(np.float32)


# --------------------------------------------------------------------------- model UDFs


class ClipScorer:
    """Ray Data callable class: factual score (CLIP image-text cosine) and top-k ANPs per image.

    Batch in: ``pixels`` [B, 3, S, S], ``text`` [B], ``factual_score`` [B] and ``anps`` [B]
    (nullable; given values are kept). Batch out: same columns without ``pixels``.
    """

    def __init__(self, model_name: str, pretrained: str, vocab: list[str], top_k: int, precision: str):
        import torch

        self.device = backbones.default_device()
        # A fixed seed makes randomly initialised models (pretrained="": tests, the embedded
        # world) identical in every actor, so scores do not depend on which actor ran a batch.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            bundle = backbones.create_clip(model_name, pretrained)
        self.model = bundle.model.to(self.device)
        self.tokenizer = bundle.tokenizer
        self.precision = precision
        self.vocab = np.array(vocab, dtype=object)
        self.top_k = min(top_k, len(vocab))
        with torch.inference_mode():
            prompts = [ANP_PROMPT.format(a) for a in vocab]
            self.vocab_features = torch.cat(
                [self._encode_text(prompts[i : i + 256]) for i in range(0, len(prompts), 256)]
            )  # [V, D], L2-normalised

    def _encode_text(self, texts: list[str]):
        tokens = self.tokenizer(list(texts)).to(self.device)
        with backbones.autocast(self.device, self.precision):
            features = self.model.encode_text(tokens)
        return _l2_normalize(features.float())

    def __call__(self, batch: dict) -> dict:
        import torch

        out = {k: v for k, v in batch.items() if k != "pixels"}
        need_factual = _missing(batch["factual_score"])
        need_anps = _missing(batch["anps"])
        if not (need_factual.any() or need_anps.any()):
            return out
        with torch.inference_mode():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"])).to(self.device)
            with backbones.autocast(self.device, self.precision):
                image_features = self.model.encode_image(pixels)
            image_features = _l2_normalize(image_features.float())  # [B, D]
            factual = _as_float32(batch["factual_score"])
            if need_factual.any():
                text_features = self._encode_text([str(t) for t in batch["text"]])  # [B, D]
                cosine = (image_features * text_features).sum(-1).cpu().numpy()
                factual[need_factual] = cosine[need_factual]
            anps = np.array(batch["anps"], dtype=object)
            if need_anps.any():
                top = (image_features @ self.vocab_features.T).topk(self.top_k, dim=-1).indices.cpu().numpy()
                for row in np.flatnonzero(need_anps):
                    anps[row] = ANP_SEPARATOR.join(self.vocab[top[row]])
        out["factual_score"] = factual
        out["anps"] = anps
        return out


def _l2_normalize(x):
    import torch

    return torch.nn.functional.normalize(x, dim=-1)


def anp_phrase(anps: str) -> str:
    """The text the sentiment model reads for an image's ANPs: "happy dog, sunny beach"."""
    return ", ".join(a.strip() for a in str(anps).split(";") if a.strip())


class SentimentScorer:
    """Ray Data callable class: emotional score = cosine of the sentiment text encoder's
    embeddings of the image's ANP phrase and of the post text.

    Batch in: ``anps`` [B], ``text`` [B], ``emotional_score`` [B] (nullable; given values kept).
    """

    def __init__(self, model_name: str, pooling: str, precision: str):
        self.device = backbones.default_device()
        self.encoder = backbones.TextEncoder(model_name, pooling, SENTIMENT_MAX_LENGTH).to(self.device)
        self.precision = precision

    def __call__(self, batch: dict) -> dict:
        out = dict(batch)
        need = _missing(batch["emotional_score"])
        if not need.any():
            return out
        rows = np.flatnonzero(need)
        no_anps = [int(r) for r in rows if batch["anps"][r] is None]
        if no_anps:
            raise ValueError(f"pair {batch['id'][no_anps[0]]!r} has neither ANPs nor an emotional score")
        with backbones.autocast(self.device, self.precision):
            anp_features = self.encoder.encode([anp_phrase(batch["anps"][r]) for r in rows])
            text_features = self.encoder.encode([str(batch["text"][r]) for r in rows])
        cosine = (_l2_normalize(anp_features.float()) * _l2_normalize(text_features.float())).sum(-1)
        emotional = _as_float32(batch["emotional_score"])
        emotional[rows] = cosine.cpu().numpy()
        out["emotional_score"] = emotional
        return out


def to_raw_scores(batch: dict) -> pa.Table:
    """The stored columns of a scored batch, as :data:`RAW_SCORES`."""
    planted = batch.get("planted_partition")
    if planted is None:
        planted_arr = pa.nulls(len(batch["id"]), pa.int8())
    else:
        missing = _missing(planted)
        planted_arr = pa.array([None if m else int(p) for p, m in zip(planted, missing)], pa.int8())
    return pa.Table.from_arrays(
        [
            pa.array([str(i) for i in batch["id"]], pa.string()),
            pa.array(_as_float32(batch["factual_score"])),
            pa.array(_as_float32(batch["emotional_score"])),
            pa.array([None if a is None else str(a) for a in batch["anps"]], pa.string()),
            planted_arr,
        ],
        schema=RAW_SCORES,
    )


# --------------------------------------------------------------------------- scoring pipeline


def _needed_models(pairs_uri: str) -> tuple[bool, bool]:
    """(CLIP needed, sentiment model needed) given which precomputed values are missing.

    Reads three small columns on the driver (Parquet column projection; no image bytes).
    """
    import pyarrow.compute as pc

    table = storage.read_parquet_dir(pairs_uri, columns=["factual_score", "emotional_score", "anps"])
    no_emotional = table.column("emotional_score").is_null()
    no_anps = table.column("anps").is_null()
    need_sentiment = bool(pc.any(no_emotional).as_py())
    need_clip = table.column("factual_score").null_count > 0 or bool(pc.any(pc.and_(no_emotional, no_anps)).as_py())
    return need_clip, need_sentiment


def _actor_args(pcfg: PartitionConfig) -> dict:
    """map_batches arguments of one model stage's actor pool (two pools run at once)."""
    import ray

    from pacl_ray.stages.runtime import cluster_cpus, cluster_gpus

    args: dict = {
        "compute": ray.data.ActorPoolStrategy(size=pcfg.concurrency),
        "batch_size": pcfg.batch_size,
        "batch_format": "numpy",
    }
    if cluster_gpus() > 0:
        args["num_gpus"] = pcfg.num_gpus
    else:
        # CPU-only: whole-CPU actors would take every CPU of a small machine and leave none
        # for the read / decode / write tasks (a deadlock on 2 cores); keep half for them.
        actors = 2 * pcfg.concurrency
        args["num_cpus"] = min(1.0, max(cluster_cpus(), 1.0) / (2 * actors))
    return args


def build_scoring_pipeline(ds, pcfg: PartitionConfig, vocab: list[str], need_clip: bool, need_sentiment: bool):
    """The lazy Ray Data pipeline: PAIRS rows -> RAW_SCORES rows."""
    ds = ds.select_columns(SCORING_INPUT_COLUMNS)
    actor_args = _actor_args(pcfg)
    if need_clip:
        ds = ds.map_batches(
            preprocess_images, batch_format="numpy", batch_size=pcfg.batch_size,
            fn_kwargs={"transform": clip_eval_transform(pcfg.clip_model, pcfg.clip_pretrained)},
        )
        ds = ds.map_batches(
            ClipScorer,
            fn_constructor_kwargs=dict(
                model_name=pcfg.clip_model, pretrained=pcfg.clip_pretrained, vocab=vocab,
                top_k=pcfg.anp_top_k, precision=pcfg.precision,
            ),
            **actor_args,
        )
    else:
        ds = ds.drop_columns(["image"])
    if need_sentiment:
        ds = ds.map_batches(
            SentimentScorer,
            fn_constructor_kwargs=dict(
                model_name=pcfg.sentiment_model, pooling=pcfg.sentiment_pooling, precision=pcfg.precision
            ),
            **actor_args,
        )
    return ds.map_batches(to_raw_scores, batch_format="numpy", batch_size=pcfg.batch_size)


def score_table_locally(
    pairs: pa.Table, pcfg: PartitionConfig, vocab: list[str], batch_size: int = 0,
    need_clip: bool = True, need_sentiment: bool = True,
) -> pa.Table:
    """The scoring pipeline's UDFs in a plain loop in this process: PAIRS rows -> RAW_SCORES rows.

    The small-input path of :func:`run_scoring`, and the reference its Ray Data pipeline is tested
    against. ``need_clip`` / ``need_sentiment`` False skip a model, as the pipeline does.
    """
    from pacl_ray.stages.runtime import numpy_batches

    batch_size = batch_size or pcfg.batch_size
    steps = []
    if need_clip:
        transform = clip_eval_transform(pcfg.clip_model, pcfg.clip_pretrained)
        clip = ClipScorer(pcfg.clip_model, pcfg.clip_pretrained, vocab, pcfg.anp_top_k, pcfg.precision)
        steps += [lambda batch: preprocess_images(batch, transform), clip]
    if need_sentiment:
        steps.append(SentimentScorer(pcfg.sentiment_model, pcfg.sentiment_pooling, pcfg.precision))
    columns = [c for c in SCORING_INPUT_COLUMNS if need_clip or c != "image"]
    tables = []
    for batch in numpy_batches(pairs.select(columns), batch_size):
        for step in steps:
            batch = step(batch)
        tables.append(to_raw_scores(batch))
    return pa.concat_tables(tables) if tables else RAW_SCORES.empty_table()


def _vocab_fingerprint(pcfg: PartitionConfig) -> str:
    return hashlib.sha256("\n".join(load_anp_vocab(pcfg.anp_vocab)).encode("utf-8")).hexdigest()[:16]


def _weights_identity(pretrained: str) -> Any:
    """A pretrained tag as is; a local or remote checkpoint file by its fingerprint."""
    if pretrained and ("://" in pretrained or os.path.isfile(os.path.expanduser(pretrained))):
        return cache.file_fingerprint(os.path.expanduser(pretrained))
    return pretrained


def scoring_key(cfg: RunConfig, ingest: cache.StageOutput) -> str:
    """Ingest key + every partition field that changes a raw score (not sigma or calibration)."""
    p = cfg.partition
    return cache.content_key(
        SCORES_STAGE, SCORES_VERSION, ingest.key, p.clip_model, _weights_identity(p.clip_pretrained),
        _vocab_fingerprint(p),
        p.anp_top_k, p.sentiment_model, p.sentiment_pooling, p.precision,
    )


def run_scoring(cfg: RunConfig, ingest: cache.StageOutput) -> cache.StageOutput:
    """Score every ingested pair with the configured models (cached; see module docstring)."""
    import ray

    pcfg = cfg.partition
    key = scoring_key(cfg, ingest)
    uri = cache.stage_uri(cfg.output_dir, SCORES_STAGE, key)
    if cache.is_complete(uri):
        return cache.StageOutput(SCORES_STAGE, key, uri, cached=True)
    storage.delete_dir(uri)

    from pacl_ray.stages.runtime import init_ray, runs_in_process

    init_ray(cfg.ray)
    vocab = load_anp_vocab(pcfg.anp_vocab)
    pairs_uri, raw_uri = ingest.path("pairs"), storage.join(uri, "raw_scores")
    need_clip, need_sentiment = _needed_models(pairs_uri)
    in_process = runs_in_process(storage.parquet_rows(pairs_uri), cfg.ray)
    if in_process:
        pairs = storage.read_parquet_dir(pairs_uri, columns=SCORING_INPUT_COLUMNS)
        raw = score_table_locally(pairs, pcfg, vocab, need_clip=need_clip, need_sentiment=need_sentiment)
        storage.write_parquet(raw, raw_uri)
    else:
        scored = build_scoring_pipeline(ray.data.read_parquet(pairs_uri), pcfg, vocab, need_clip, need_sentiment)
        scored.write_parquet(raw_uri)
    save_config(cfg, uri)
    summary = {
        "ingest_uri": ingest.uri, "ingest_key": ingest.key, "ran_clip": need_clip, "ran_sentiment": need_sentiment,
        "executor": "in_process" if in_process else "ray_data",
    }
    cache.mark_complete(uri, summary)
    return cache.StageOutput(SCORES_STAGE, key, uri, cached=False)


# --------------------------------------------------------------------------- thresholds and report


def partition_key(cfg: RunConfig, scores: cache.StageOutput) -> str:
    p = cfg.partition
    return cache.content_key(
        PARTITION_STAGE, PARTITION_VERSION, scores.key, p.factual_calibration, p.emotional_calibration,
        thresholds(p), p.report_examples, cfg.seed, p.use_scores,
    )


def scores_table(raw: pa.Table, pcfg: PartitionConfig) -> pa.Table:
    """RAW_SCORES -> :data:`tables.SCORES` (calibrated scores and partition at the config's sigma)."""
    factual = raw.column("factual_score").to_numpy()
    emotional = raw.column("emotional_score").to_numpy()
    factual_cal, emotional_cal = calibrated_scores(factual, emotional, pcfg.factual_calibration, pcfg.emotional_calibration)
    codes = assign_partitions(factual, emotional, **partition_args(pcfg))
    return pa.Table.from_arrays(
        [
            raw.column("id"), raw.column("factual_score"), raw.column("emotional_score"), raw.column("anps"),
            pa.array(factual_cal.astype(np.float32)), pa.array(emotional_cal.astype(np.float32)),
            pa.array(codes, pa.int8()),
        ],
        schema=tables.SCORES,
    )


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
        known = np.isin(planted, (1, 2, 3, 4))
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
    for code, entry in report["partitions"].items():
        lines.append(f"  {code} {entry['name']:<26} {entry['count']:>8}  {entry['percent']:6.2f}%")
    agreement = report.get("planted_agreement")
    if agreement:
        lines.append(f"  planted vs assigned: accuracy {agreement['accuracy']:.4f} over {agreement['pairs']} pairs")
        lines.append("  confusion (rows planted 1-4, columns assigned 1-4):")
        lines += ["    " + " ".join(f"{n:>7}" for n in row) for row in agreement["confusion_matrix"]]
    return "\n".join(lines)


def plot_histograms(table: pa.Table, pcfg: PartitionConfig) -> bytes:
    """PNG of raw and calibrated score histograms with the thresholds marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sigma_f, sigma_e = thresholds(pcfg)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        ("factual_score", "factual (raw cosine)", None),
        ("emotional_score", "emotional (raw cosine)", None),
        ("factual_calibrated", f"factual ({pcfg.factual_calibration})", sigma_f),
        ("emotional_calibrated", f"emotional ({pcfg.emotional_calibration})", sigma_e),
    ]
    for ax, (column, title, sigma) in zip(axes.flat, panels):
        ax.hist(table.column(column).to_numpy(), bins=50, color="#4c72b0")
        if sigma is not None:
            ax.axvline(sigma, color="#c44e52", linestyle="--", label=f"sigma = {sigma:g}")
            ax.legend()
        ax.set_title(title)
        ax.set_ylabel("pairs")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _thumbnail_base64(data: bytes, size: int = 160) -> str:
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
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
    key = partition_key(cfg, scores)
    uri = cache.stage_uri(cfg.output_dir, PARTITION_STAGE, key)
    if cache.is_complete(uri):
        summary = cache.read_summary(uri)
        if "partitions" in summary:
            print(format_split(summary) + "\n  [cached]")
        return cache.StageOutput(PARTITION_STAGE, key, uri, cached=True)
    storage.delete_dir(uri)

    raw = storage.read_parquet_dir(scores.path("raw_scores")).cast(RAW_SCORES)
    table = scores_table(raw, pcfg)
    codes = table.column("partition").to_numpy()
    planted = raw.column("planted_partition").fill_null(0).to_numpy()
    report = split_report(codes, pcfg, planted)

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
    save_config(cfg, uri)
    print(format_split(report))
    cache.mark_complete(uri, report)
    return cache.StageOutput(PARTITION_STAGE, key, uri, cached=False)


def read_scores(partition: cache.StageOutput) -> pa.Table:
    """The :data:`tables.SCORES` table of a finished partition stage."""
    return storage.read_parquet_dir(partition.path("scores")).cast(tables.SCORES)
