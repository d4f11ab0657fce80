"""Stage 2a (paper 3.2): unimodal features of every pair, by Ray Data batch inference.

    pairs/ (id, image bytes, text)
      -> CPU map_batches: decode + the backbone's own eval transform      -> pixels [B, 3, H, W]
      -> actor pool ImageFeatureExtractor (pacl_ray.stages.image_features, shared with evaluation):
                                        the *initial* target backbone   -> image_feature [B, D_image]
      -> actor pool TextFeatureExtractor: the frozen text encoder        -> text_feature  [B, D_text]
      -> features/ Parquet, tables.features_schema(D_image, D_text, float16|float32)

The image features feed the factual k-means (:mod:`pacl_ray.stages.pseudo_labels`). The text features feed
the emotional k-means **and are exactly what training uses for the frozen text tower**: the text
encoder is frozen (paper 3.3), so its output per pair never changes, and training reads these
stored vectors instead of running the encoder again. That removes the text forward pass from
every training step, about half the compute of a naive implementation. Anything that changes the
text features (``model.text_encoder``, ``text_pooling``, ``text_max_length``,
``embed.feature_dtype``) changes this stage's content key, and therefore training's inputs.

The steps run through :mod:`pacl_ray.stages.executor`: inputs of at most
``ray.in_process_max_rows`` pairs run the same UDFs in a loop in the calling process instead
(actor start-up would dominate them).

Models load once per actor (callable classes). Actors take ``embed.num_gpus`` GPUs each when the
Ray cluster has GPUs, and then run under bf16/fp16 autocast (``embed.precision``); on CPU they
run in float32.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pyarrow as pa

from pacl_ray.config import RunConfig, backbone_args
from pacl_ray.core import backbones
from pacl_ray.formats import storage, tables
from pacl_ray.formats.export import local_file
from pacl_ray.stages import cache, executor
from pacl_ray.stages.cache import StageOutput
from pacl_ray.stages.executor import Udf
from pacl_ray.stages.image_features import ImageFeatureExtractor

STAGE = "embed"
FEATURE_DTYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}


def feature_dtype(name: str) -> tuple[type, pa.DataType]:
    if name not in FEATURE_DTYPES:
        raise ValueError(f"embed.feature_dtype must be one of {sorted(FEATURE_DTYPES)}, got {name!r}")
    return FEATURE_DTYPES[name]


def features_table(
    ids: Any, image_features: np.ndarray, text_features: np.ndarray, dtype: str = "float32"
) -> pa.Table:
    """ids [B], image float [B, Di], text float [B, Dt] -> a FEATURES table (fixed-size lists).

    Raises ValueError naming the ids and the modality when a feature is NaN or infinite (also
    after a float16 cast overflows), so non-finite features are never written."""
    np_dtype, pa_dtype = feature_dtype(dtype)

    def column(x: np.ndarray, name: str) -> pa.FixedSizeListArray:
        with np.errstate(over="ignore"):  # a float16 overflow is reported just below
            x = np.ascontiguousarray(x, dtype=np_dtype)
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            named = [str(i) for i, b in zip(ids, bad) if b][:10]
            raise ValueError(f"embed: non-finite {name} (NaN or inf, dtype {dtype}) for {int(bad.sum())} pair(s), ids {named}")
        return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), type=pa_dtype), x.shape[1])

    out_schema = tables.features_schema(image_features.shape[1], text_features.shape[1], pa_dtype)
    return pa.Table.from_arrays(
        [pa.array(list(ids), pa.string()), column(image_features, "image_feature"), column(text_features, "text_feature")],
        schema=out_schema,
    )


# --------------------------------------------------------------------------- Ray Data UDFs


def decode_and_transform(batch: dict[str, np.ndarray], transform: Callable) -> dict[str, np.ndarray]:
    """CPU step: encoded image bytes -> the backbone's eval tensors, float32 [B, 3, H, W]."""
    from pacl_ray.formats.images import decode_rgb, min_side_for

    min_side = min_side_for(transform)  # large JPEGs decode at reduced scale, never below the resize
    pixels = []
    for pair_id, data in zip(batch[tables.ID], batch["image"]):
        try:
            pixels.append(np.asarray(transform(decode_rgb(data, min_side=min_side)), dtype=np.float32))
        except Exception as err:  # ingest validated the bytes; say which row if one still fails
            raise ValueError(f"embed: pairs row id={pair_id!r} field 'image': cannot decode ({err})") from err
    return {tables.ID: batch[tables.ID], "text": batch["text"], "pixels": np.stack(pixels)}


class TextFeatureExtractor:
    """Actor UDF: texts [B] -> frozen text-encoder features [B, D_text]; emits the FEATURES table."""

    def __init__(self, name: str, pooling: str, max_length: int, precision: str, dtype: str):
        self.device = backbones.default_device()
        self.encoder = backbones.TextEncoder(name, pooling, max_length).to(self.device)
        self.precision = precision
        self.dtype = dtype

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        texts = [str(t) for t in batch["text"]]
        with torch.inference_mode(), backbones.autocast(self.device, self.precision):
            text_features = self.encoder.encode(texts, batch_size=max(1, len(texts))).float().cpu().numpy()
        image_features = np.asarray(batch["image_feature"], dtype=np.float32)
        return features_table(batch[tables.ID], image_features, text_features, self.dtype)


def embed_udfs(transform: Callable, image_kwargs: dict, text_kwargs: dict,
               image_extractor: "ImageFeatureExtractor | None" = None) -> list[Udf]:
    """The stage's steps: PAIRS batches (id, image, text) -> FEATURES tables. ``image_extractor``:
    a backbone already built in this process (used instead of building another)."""
    return [
        Udf(decode_and_transform, {"transform": transform}),
        Udf(ImageFeatureExtractor, image_kwargs, actor=True, instance=image_extractor),
        Udf(TextFeatureExtractor, text_kwargs, actor=True),
    ]


def embed_table_locally(
    pairs: pa.Table, image_extractor: ImageFeatureExtractor, text_extractor: TextFeatureExtractor, batch_size: int
) -> pa.Table:
    """The stage's UDFs in a plain loop in this process: PAIRS (id, image, text) -> FEATURES."""
    udfs = [Udf(decode_and_transform, {"transform": image_extractor.eval_transform}),
            Udf(ImageFeatureExtractor, instance=image_extractor), Udf(TextFeatureExtractor, instance=text_extractor)]
    return executor.apply_in_process(pairs.select([tables.ID, "image", "text"]), udfs, batch_size)


# --------------------------------------------------------------------------- stage


def pairs_identity(ingest: StageOutput) -> object:
    """What the pairs' ids, images and texts are: ingest's content fingerprint of those columns
    (its summary's ``content_fingerprint``), so a manifest that changes only scores, ANPs, labels
    or partitions keeps the embed and cluster keys. An ingest output without one (written before
    the fingerprint existed, or hand-made) is identified by its own key."""
    try:
        fingerprint = cache.read_summary(ingest.uri).get("content_fingerprint")
    except (FileNotFoundError, OSError, ValueError):
        fingerprint = None
    return {"pairs_content": fingerprint} if fingerprint else ingest


def embed_key(cfg: RunConfig, ingest: StageOutput) -> str:
    m = cfg.model
    checkpoint = cache.file_fingerprint(m.backbone_checkpoint) if m.backbone_checkpoint else ""
    return cache.content_key(
        STAGE, pairs_identity(ingest), m.backbone, m.backbone_pretrained, checkpoint, m.backbone_input_size,
        m.text_encoder, m.text_pooling, m.text_max_length, cfg.embed.feature_dtype,
        # transform and architecture settings: keyed only when set, so existing keys stay valid
        *([{"backbone_kwargs": m.backbone_kwargs}] if m.backbone_kwargs else []),
        *([{"crop_pct": m.crop_pct}] if m.crop_pct is not None else []),
        *([{"interpolation": m.interpolation}] if m.interpolation else []),
    )


def check_backbone(cfg: RunConfig) -> None:
    """Before any stage runs: the configured backbone builds with ``model.backbone_kwargs`` and its
    checkpoint (if any) loads with its classifier dropped. Raises
    :class:`pacl_ray.core.backbones.CheckpointMismatchError` naming the file and the first
    mismatching key, or ValueError / timm's error for bad kwargs."""
    m = cfg.model
    backbones.check_backbone(m.backbone, local_file(m.backbone_checkpoint), m.backbone_kwargs)


def text_dim(name_or_path: str) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(backbones.resolve_hf_path(name_or_path)).hidden_size)


def run_embed(cfg: RunConfig, ingest: StageOutput) -> StageOutput:
    """Image and text features of every ingested pair (cached by content key)."""
    from pacl_ray.stages import runtime

    feature_dtype(cfg.embed.feature_dtype)  # fail before any work on a bad name
    m, e = cfg.model, cfg.embed

    def build(uri: str) -> dict:
        # On the driver, before any actor starts: a text encoder that cannot be loaded is one line
        # (ModelLoadError naming model.text_encoder), not a traceback from each Ray Data actor.
        backbones.check_text_model(m.text_encoder, "model.text_encoder")
        pairs_files = cache.table_files(ingest, "pairs")
        features_uri = storage.join(uri, "features")
        image_kwargs = dict(backbone=m.backbone, pretrained=m.backbone_pretrained, checkpoint=m.backbone_checkpoint,
                            input_size=m.backbone_input_size, crop_pct=m.crop_pct, interpolation=m.interpolation,
                            model_kwargs=dict(m.backbone_kwargs), precision=e.precision)
        text_kwargs = dict(name=m.text_encoder, pooling=m.text_pooling, max_length=m.text_max_length,
                           precision=e.precision, dtype=e.feature_dtype)
        rows = storage.parquet_rows(pairs_files)
        if rows == 0:
            raise ValueError(f"embed: {ingest.path('pairs')} holds no pairs (every record was quarantined at ingest?)")
        runtime.init_ray(cfg.ray)
        if executor.runs_in_process(rows, cfg.ray):
            # The in-process path needs the backbone here anyway: take its transform and width from it.
            image_extractor = ImageFeatureExtractor(**image_kwargs)
            transform, image_dim = image_extractor.eval_transform, image_extractor.num_features
        else:
            # The driver builds the backbone once only to learn its eval transform and feature width.
            image_extractor = None
            built = backbones.create_backbone(**{**backbone_args(cfg), "checkpoint": local_file(m.backbone_checkpoint)})
            transform, image_dim = built.eval_transform, built.num_features
            del built
        ran = executor.run_udfs(
            cache.table_dir(ingest, "pairs"), [tables.ID, "image", "text"], embed_udfs(transform, image_kwargs, text_kwargs),
            features_uri, pool=executor.actor_pool(e, pools=2), batch_size=e.batch_size,
            ray_cfg=cfg.ray,
            in_process_udfs=embed_udfs(transform, image_kwargs, text_kwargs, image_extractor),
        )
        written = storage.parquet_rows(features_uri)
        if written != rows:
            raise RuntimeError(f"embed: wrote {written} feature rows to {features_uri}, expected {rows} pairs")
        return dict(rows=written, image_dim=image_dim, text_dim=text_dim(m.text_encoder), dtype=e.feature_dtype,
                    executor=ran)

    return cache.run_cached(cfg.output_dir, STAGE, embed_key(cfg, ingest), build, config=cfg, describe=format_summary)


def format_summary(summary: dict) -> str:
    return (f"embed: {summary['rows']} pairs -> image {summary['image_dim']}-d, "
            f"text {summary['text_dim']}-d {summary['dtype']} features")


def load_features(embed: StageOutput, columns: list[str] | None = None) -> pa.Table:
    """The FEATURES table of an embed stage (``columns`` projects it), each file checked against
    the stage's completion record. Raises :class:`pacl_ray.stages.cache.StageDataError` naming
    the file when one is missing, damaged or lacks a column."""
    return cache.read_table(embed, "features", columns=columns)
