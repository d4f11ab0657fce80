"""Stage 1a (paper 3.1): factual and emotional scores of every pair (stage ``scores``).

Run by :func:`run_scoring`, cached independently of sigma so a sigma sweep never re-runs a model::

    pairs -> preprocess_images (CPU)  -> ClipScorer (actors)       factual cosine, top-k ANPs
          -> SentimentScorer (actors)                             emotional cosine
          -> to_raw_scores            -> raw_scores/ (RAW_SCORES)

The steps go through :mod:`pacl_ray.stages.executor`: in this process for inputs of at most
``ray.in_process_max_rows`` pairs, else as a Ray Data pipeline whose model steps are actor pools
(``partition.num_gpus`` GPUs each when the cluster has GPUs, bf16/fp16 autocast there).
Precomputed ``factual_score`` / ``emotional_score`` / ``anps`` columns are used as given, and a
model is skipped entirely when nothing needs it. A pair with a given ``partition`` (codes 1-4)
needs no score: the models skip it, its missing scores are stored as NaN, and the partition
stage uses its code as given. Thresholding the stored scores is
:mod:`pacl_ray.stages.partition`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pacl_ray.config import PartitionConfig, RunConfig
from pacl_ray.core import backbones
from pacl_ray.formats import storage, tables
from pacl_ray.stages import cache, executor
from pacl_ray.stages.executor import ActorPool, Udf

SCORES_STAGE = "scores"
SCORES_VERSION = 2
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
        pa.field("partition", pa.int8()),  # a code given in the manifest (used as given), else null
    ]
)
SCORING_INPUT_COLUMNS = ["id", "image", "text", "anps", "factual_score", "emotional_score", "planted_partition",
                         "partition"]


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
    from pacl_ray.formats.images import decode_rgb, min_side_for

    min_side = min_side_for(transform)  # large JPEGs decode at reduced scale, never below the resize
    pixels = [transform(decode_rgb(data, min_side=min_side)).numpy() for data in batch["image"]]
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


def _given_partition(batch: dict) -> np.ndarray:
    """Bool [B]: which pairs carry a partition code given in the manifest (they need no score)."""
    given = batch.get("partition")
    if given is None:
        return np.zeros(len(batch["id"]), dtype=bool)
    return ~_missing(given)


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
            bundle = backbones.create_clip(model_name, pretrained, config_key="partition.clip_model",
                                           weights_key="partition.clip_pretrained")
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
        given = _given_partition(batch)
        need_factual = _missing(batch["factual_score"]) & ~given
        need_anps = _missing(batch["anps"]) & ~given
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
        self.encoder = backbones.TextEncoder(model_name, pooling, SENTIMENT_MAX_LENGTH,
                                             config_key="partition.sentiment_model").to(self.device)
        self.precision = precision

    def __call__(self, batch: dict) -> dict:
        out = dict(batch)
        need = _missing(batch["emotional_score"]) & ~_given_partition(batch)
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
    def codes(values: Any) -> pa.Array:
        if values is None:
            return pa.nulls(len(batch["id"]), pa.int8())
        missing = _missing(values)
        return pa.array([None if m else int(p) for p, m in zip(values, missing)], pa.int8())

    return pa.Table.from_arrays(
        [
            pa.array([str(i) for i in batch["id"]], pa.string()),
            pa.array(_as_float32(batch["factual_score"])),
            pa.array(_as_float32(batch["emotional_score"])),
            pa.array([None if a is None else str(a) for a in batch["anps"]], pa.string()),
            codes(batch.get("planted_partition")),
            codes(batch.get("partition")),
        ],
        schema=RAW_SCORES,
    )


# --------------------------------------------------------------------------- scoring pipeline


def _needed_models(pairs_files: list[str]) -> tuple[bool, bool]:
    """(CLIP needed, sentiment model needed) given which precomputed values are missing.

    Reads three small columns on the driver (Parquet column projection; no image bytes).
    """
    import pyarrow.compute as pc

    table = storage.read_parquet_dir(pairs_files, columns=["factual_score", "emotional_score", "anps", "partition"])
    if table.num_rows == 0:
        return False, False
    unknown = table.column("partition").is_null()  # a given partition needs no score
    no_emotional = pc.and_(table.column("emotional_score").is_null(), unknown)
    no_anps = table.column("anps").is_null()
    need_sentiment = bool(pc.any(no_emotional).as_py())
    no_factual = pc.and_(table.column("factual_score").is_null(), unknown)
    need_clip = bool(pc.any(no_factual).as_py()) or bool(pc.any(pc.and_(no_emotional, no_anps)).as_py())
    return need_clip, need_sentiment


def scoring_udfs(pcfg: PartitionConfig, vocab: list[str], need_clip: bool, need_sentiment: bool) -> list[Udf]:
    """The scoring steps: PAIRS batches (:data:`SCORING_INPUT_COLUMNS`) -> RAW_SCORES tables."""
    udfs = []
    if need_clip:
        udfs.append(Udf(preprocess_images, {"transform": clip_eval_transform(pcfg.clip_model, pcfg.clip_pretrained)}))
        udfs.append(Udf(ClipScorer, dict(model_name=pcfg.clip_model, pretrained=pcfg.clip_pretrained, vocab=vocab,
                                         top_k=pcfg.anp_top_k, precision=pcfg.precision), actor=True))
    if need_sentiment:
        udfs.append(Udf(SentimentScorer, dict(model_name=pcfg.sentiment_model, pooling=pcfg.sentiment_pooling,
                                              precision=pcfg.precision), actor=True))
    udfs.append(Udf(to_raw_scores))
    return udfs


def scoring_columns(need_clip: bool) -> list[str]:
    return [c for c in SCORING_INPUT_COLUMNS if need_clip or c != "image"]


def scoring_pool(pcfg: PartitionConfig) -> ActorPool:
    return executor.actor_pool(pcfg, pools=2)  # CLIP and sentiment pools run at once


def build_scoring_pipeline(ds, pcfg: PartitionConfig, vocab: list[str], need_clip: bool, need_sentiment: bool):
    """The lazy Ray Data pipeline: a dataset of PAIRS rows -> RAW_SCORES rows."""
    udfs = scoring_udfs(pcfg, vocab, need_clip, need_sentiment)
    return executor.apply_ray_data(ds.select_columns(scoring_columns(need_clip)), udfs, pcfg.batch_size,
                                   scoring_pool(pcfg))


def score_table_locally(
    pairs: pa.Table, pcfg: PartitionConfig, vocab: list[str], batch_size: int = 0,
    need_clip: bool = True, need_sentiment: bool = True,
) -> pa.Table:
    """The scoring UDFs in a plain loop in this process: PAIRS rows -> RAW_SCORES rows.

    The small-input path of :func:`run_scoring`, and the reference its Ray Data pipeline is tested
    against. ``need_clip`` / ``need_sentiment`` False skip a model, as the pipeline does.
    """
    return executor.apply_in_process(
        pairs.select(scoring_columns(need_clip)), scoring_udfs(pcfg, vocab, need_clip, need_sentiment),
        batch_size or pcfg.batch_size, empty=RAW_SCORES,
    )


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


def check_scoring_models(pcfg: PartitionConfig, need_clip: bool, need_sentiment: bool) -> None:
    """On the driver, before any actor starts: the scoring models that will run resolve (weights
    cached or downloaded once here). Raises :class:`pacl_ray.core.backbones.ModelLoadError` naming
    ``partition.clip_model`` / ``partition.sentiment_model``; an actor that failed to load would
    otherwise be retried by Ray and report a long traceback."""
    if need_clip:
        backbones.check_clip_weights(pcfg.clip_model, pcfg.clip_pretrained, config_key="partition.clip_model",
                                     weights_key="partition.clip_pretrained")
    if need_sentiment:
        backbones.check_text_model(pcfg.sentiment_model, config_key="partition.sentiment_model")


def run_scoring(cfg: RunConfig, ingest: cache.StageOutput) -> cache.StageOutput:
    """Score every ingested pair with the configured models (cached; see module docstring)."""
    pcfg = cfg.partition

    def build(uri: str) -> dict:
        vocab = load_anp_vocab(pcfg.anp_vocab)
        pairs_dir = cache.table_dir(ingest, "pairs")
        need_clip, need_sentiment = _needed_models(cache.table_files(ingest, "pairs"))
        check_scoring_models(pcfg, need_clip, need_sentiment)
        ran = executor.run_udfs(
            pairs_dir, scoring_columns(need_clip), scoring_udfs(pcfg, vocab, need_clip, need_sentiment),
            storage.join(uri, "raw_scores"), pool=scoring_pool(pcfg), batch_size=pcfg.batch_size,
            ray_cfg=cfg.ray, empty=RAW_SCORES,
        )
        return {"ingest_uri": ingest.uri, "ingest_key": ingest.key, "ran_clip": need_clip,
                "ran_sentiment": need_sentiment, "executor": ran}

    return cache.run_cached(cfg.output_dir, SCORES_STAGE, scoring_key(cfg, ingest), build, config=cfg,
                            describe=format_scoring)


def format_scoring(summary: dict) -> str:
    models = [m for m, ran in (("CLIP", summary.get("ran_clip")), ("sentiment", summary.get("ran_sentiment"))) if ran]
    return f"scores: {', '.join(models) or 'no model (precomputed scores)'} ({summary.get('executor', '?')})"


def read_raw_scores(scores: cache.StageOutput) -> pa.Table:
    """The :data:`RAW_SCORES` table of a finished scores stage (checked against its record)."""
    return cache.read_table(scores, "raw_scores").cast(RAW_SCORES)
