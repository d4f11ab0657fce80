"""Stage 2a (paper 3.2): unimodal features of every pair, by Ray Data batch inference.

    pairs/ (id, image bytes, text)
      -> CPU map_batches: decode + the backbone's own eval transform      -> pixels [B, 3, H, W]
      -> actor pool ImageFeatureExtractor: the *initial* target backbone -> image_feature [B, D_image]
      -> actor pool TextFeatureExtractor: the frozen text encoder        -> text_feature  [B, D_text]
      -> features/ Parquet, tables.features_schema(D_image, D_text, float16|float32)

The image features feed the factual k-means (:mod:`pacl_ray.stages.pseudo_labels`). The text features feed
the emotional k-means **and are exactly what training uses for the frozen text tower**: the text
encoder is frozen (paper 3.3), so its output per pair never changes, and training reads these
stored vectors instead of running the encoder again. That removes the text forward pass from
every training step, about half the compute of a naive implementation. Anything that changes the
text features (``model.text_encoder``, ``text_pooling``, ``text_max_length``,
``embed.feature_dtype``) changes this stage's content key, and therefore training's inputs.

Inputs of at most ``ray.in_process_max_rows`` pairs run the same UDFs in a loop in the calling
process instead (:func:`embed_table_locally`): actor start-up would dominate them.

Models load once per actor (callable classes). Actors take ``embed.num_gpus`` GPUs each when the
Ray cluster has GPUs, and then run under bf16/fp16 autocast (``embed.precision``); on CPU they
run in float32.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pacl_ray.stages import cache
from pacl_ray import config as config_mod
from pacl_ray.core import backbones
from pacl_ray.formats import tables
from pacl_ray.formats import storage
from pacl_ray.stages.cache import StageOutput
from pacl_ray.config import RunConfig

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
    from pacl_ray.formats.images import decode_rgb

    pixels = []
    for pair_id, data in zip(batch[tables.ID], batch["image"]):
        try:
            pixels.append(np.asarray(transform(decode_rgb(data)), dtype=np.float32))
        except Exception as err:  # ingest validated the bytes; say which row if one still fails
            raise ValueError(f"embed: pairs row id={pair_id!r} field 'image': cannot decode ({err})") from err
    return {tables.ID: batch[tables.ID], "text": batch["text"], "pixels": np.stack(pixels)}


def _autocast(device, precision: str):
    import torch

    dtype = backbones.autocast_dtype(precision, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class ImageFeatureExtractor:
    """Actor UDF: pixels [B, 3, H, W] -> the initial backbone's pooled features [B, D_image].
    Also keeps the backbone's eval transform and feature width for callers in the same process."""

    def __init__(self, backbone: str, pretrained: str, checkpoint: str, input_size: int, precision: str):
        self.device = backbones.default_device()
        built = backbones.create_backbone(backbone, pretrained, checkpoint, input_size)
        self.model = built.model.to(self.device).eval().requires_grad_(False)
        self.eval_transform, self.num_features = built.eval_transform, built.num_features
        self.precision = precision

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"])).to(self.device)
        with torch.inference_mode(), _autocast(self.device, self.precision):
            features = self.model(pixels).float().cpu().numpy()
        return {tables.ID: batch[tables.ID], "text": batch["text"], "image_feature": features}


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
        with torch.inference_mode(), _autocast(self.device, self.precision):
            text_features = self.encoder.encode(texts, batch_size=max(1, len(texts))).float().cpu().numpy()
        image_features = np.asarray(batch["image_feature"], dtype=np.float32)
        return features_table(batch[tables.ID], image_features, text_features, self.dtype)


def embed_table_locally(
    pairs: pa.Table, image_extractor: ImageFeatureExtractor, text_extractor: TextFeatureExtractor, batch_size: int
) -> pa.Table:
    """The stage's UDFs in a plain loop in this process: PAIRS (id, image, text) -> FEATURES."""
    from pacl_ray.stages.runtime import numpy_batches

    tables = [
        text_extractor(image_extractor(decode_and_transform(batch, image_extractor.eval_transform)))
        for batch in numpy_batches(pairs, batch_size)
    ]
    return pa.concat_tables(tables)


# --------------------------------------------------------------------------- stage


def embed_key(cfg: RunConfig, ingest: StageOutput) -> str:
    m = cfg.model
    checkpoint = cache.file_fingerprint(m.backbone_checkpoint) if m.backbone_checkpoint else ""
    return cache.content_key(
        STAGE, ingest, m.backbone, m.backbone_pretrained, checkpoint, m.backbone_input_size,
        m.text_encoder, m.text_pooling, m.text_max_length, cfg.embed.feature_dtype,
    )


def text_dim(name_or_path: str) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(backbones.resolve_hf_path(name_or_path)).hidden_size)


def _actor_resources(cfg: RunConfig) -> dict:
    import ray

    from pacl_ray.stages import runtime

    kwargs: dict = dict(
        compute=ray.data.ActorPoolStrategy(size=cfg.embed.concurrency), batch_size=cfg.embed.batch_size
    )
    if runtime.cluster_gpus() > 0:
        kwargs["num_gpus"] = cfg.embed.num_gpus
    return kwargs


def run_embed(cfg: RunConfig, ingest: StageOutput) -> StageOutput:
    """Image and text features of every ingested pair (cached by content key)."""
    import ray

    from pacl_ray.stages import runtime

    feature_dtype(cfg.embed.feature_dtype)  # fail before any work on a bad name
    key = embed_key(cfg, ingest)
    uri = cache.stage_uri(cfg.output_dir, STAGE, key)
    if cache.is_complete(uri):
        return StageOutput(STAGE, key, uri, cached=True)
    runtime.init_ray(cfg.ray)
    m = cfg.model
    pairs_uri = ingest.path("pairs")
    features_uri = storage.join(uri, "features")
    storage.delete_dir(uri)  # leftovers of an interrupted run
    image_kwargs = dict(
        backbone=m.backbone, pretrained=m.backbone_pretrained, checkpoint=m.backbone_checkpoint,
        input_size=m.backbone_input_size, precision=cfg.embed.precision,
    )
    text_kwargs = dict(
        name=m.text_encoder, pooling=m.text_pooling, max_length=m.text_max_length,
        precision=cfg.embed.precision, dtype=cfg.embed.feature_dtype,
    )
    rows = storage.parquet_rows(pairs_uri)
    if rows == 0:
        raise ValueError(f"embed: {pairs_uri} holds no pairs (every record was quarantined at ingest?)")
    in_process = runtime.runs_in_process(rows, cfg.ray)
    if in_process:
        image_extractor = ImageFeatureExtractor(**image_kwargs)
        image_dim = image_extractor.num_features
        pairs = storage.read_parquet_dir(pairs_uri, columns=[tables.ID, "image", "text"])
        features = embed_table_locally(pairs, image_extractor, TextFeatureExtractor(**text_kwargs), cfg.embed.batch_size)
        storage.write_parquet(features, features_uri)
    else:
        # The driver builds the backbone once only to learn its eval transform and feature width.
        backbone = backbones.create_backbone(m.backbone, m.backbone_pretrained, m.backbone_checkpoint, m.backbone_input_size)
        transform, image_dim = backbone.eval_transform, backbone.num_features
        del backbone
        fs, pairs_path = storage.resolve(pairs_uri)
        ds = ray.data.read_parquet(pairs_path, filesystem=fs, columns=[tables.ID, "image", "text"])
        ds = ds.map_batches(decode_and_transform, fn_kwargs=dict(transform=transform), batch_size=cfg.embed.batch_size)
        ds = ds.map_batches(ImageFeatureExtractor, fn_constructor_kwargs=image_kwargs, **_actor_resources(cfg))
        ds = ds.map_batches(TextFeatureExtractor, fn_constructor_kwargs=text_kwargs, **_actor_resources(cfg))
        out_fs, features_path = storage.resolve(features_uri)
        ds.write_parquet(features_path, filesystem=out_fs)
    written = storage.parquet_rows(features_uri)
    if written != rows:
        raise RuntimeError(f"embed: wrote {written} feature rows to {features_uri}, expected {rows} pairs")
    config_mod.save_config(cfg, uri)
    summary = dict(rows=written, image_dim=image_dim, text_dim=text_dim(m.text_encoder), dtype=cfg.embed.feature_dtype,
                   executor="in_process" if in_process else "ray_data")
    cache.mark_complete(uri, summary)
    print(f"embed: {written} pairs -> image {image_dim}-d, text {summary['text_dim']}-d {cfg.embed.feature_dtype} features")
    return StageOutput(STAGE, key, uri, cached=False)


def load_features(embed: StageOutput, columns: list[str] | None = None) -> pa.Table:
    """The whole FEATURES table of an embed stage (small inputs; training streams it instead)."""
    tables = []
    for file_uri in storage.list_files(embed.path("features"), ".parquet"):
        fs, path = storage.resolve(file_uri)
        tables.append(pq.read_table(path, columns=columns, filesystem=fs))
    if not tables:
        raise FileNotFoundError(f"{embed.path('features')}: no Parquet feature files")
    return pa.concat_tables(tables)
