"""Frozen features for evaluation: pooled backbone features float32 [N, D] per task split,
extracted once and cached by content key under ``{output_dir}/evaluate/features/``.

Extraction is two steps, split as the embed and partition stages split them:

    items (row, path, where)
      -> CPU map_batches task :func:`decode_images`: read + decode (pacl_ray.formats.images, the one
         decoder) + the backbone's eval transform                   -> row, pixels float32 [B, 3, H, W]
      -> model actors :class:`pacl_ray.stages.image_features.ImageFeatureExtractor` (the embed
         stage's UDF): pixels only, they never open a file          -> row, feature float32 [B, D]

in a loop in this process for at most ``ray.in_process_max_rows`` images (actor start-up would
dominate), else on Ray Data, the model in an autoscaling actor pool (``evaluate.min_actors`` ..
``evaluate.max_actors`` actors, ``evaluate.num_gpus`` each when the cluster has GPUs). Every
uncached split of every task goes through ONE pass, so the backbone loads once per actor however
many tasks there are. An image that cannot be read or decoded stops the pass with a ValueError
naming the task, split, row and file.
"""

from __future__ import annotations

import io
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa

from pacl_ray.config import RunConfig
from pacl_ray.evaluation.datasets import Split, TaskData
from pacl_ray.evaluation.resolve import BackboneRef
from pacl_ray.formats import storage
from pacl_ray.formats.export import local_file
from pacl_ray.formats.images import load_rgb
from pacl_ray.stages import cache, executor
from pacl_ray.stages.executor import Udf, run_udfs_on_table
from pacl_ray.stages.image_features import ImageFeatureExtractor


def _features_uri(cfg: RunConfig, ref: BackboneRef, fingerprint: str) -> str:
    key = cache.content_key("evaluate-features", ref.identity(), fingerprint)
    return storage.join(cfg.output_dir, "evaluate", "features", key)


def _save_array(uri: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    storage.write_bytes(uri, buffer.getvalue())


def _load_array(uri: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)


def decode_images(batch: dict[str, np.ndarray], transform: Callable) -> dict[str, np.ndarray]:
    """CPU step: a batch of ``row`` [B], ``path`` [B] (image files or URIs) and ``where`` [B] (the
    row's task, split and index, for errors) -> ``row`` [B] and ``pixels`` float32 [B, 3, H, W],
    each image read and decoded by :func:`pacl_ray.formats.images.load_rgb` and put through the
    backbone's eval ``transform`` (PIL RGB -> tensor [3, H, W]).

    Raises ValueError naming the row (``where``) and the file (credentials redacted) when an
    image cannot be read, decoded or transformed (the dataset readers validated it; it changed or
    vanished since)."""
    pixels = []
    for path, where in zip(batch["path"], batch["where"]):
        try:
            pixels.append(np.asarray(transform(load_rgb(str(path))), dtype=np.float32))
        except Exception as err:
            raise ValueError(f"evaluate: {where}, file {storage.redact(str(path))}: cannot read or decode "
                             f"the image ({type(err).__name__}: {storage.redact(str(err))})") from err
    return {"row": np.asarray(batch["row"]), "pixels": np.stack(pixels)}


def eval_transform(ref: BackboneRef, extractor: Optional[ImageFeatureExtractor] = None) -> Callable:
    """The eval transform of ``ref``'s backbone (PIL RGB -> float tensor [3, H, W]), for the CPU
    decode tasks: ``extractor``'s when one is built here anyway. A timm backbone's transform comes
    from its ``pretrained_cfg`` and the ref's overrides, never from its weights, so it is built
    without them (no checkpoint download to this process); an open_clip tower is built with its
    weights (its pretrained tag can pick the normalisation), as the embed stage does."""
    import torch

    from pacl_ray.core import backbones

    if extractor is not None:
        return extractor.eval_transform
    name = ref.name
    with torch.random.fork_rng(devices=[]):  # the random init must not move anyone's seed
        if backbones.is_open_clip_backbone(name):
            built = backbones.create_backbone(name, ref.pretrained, local_file(ref.checkpoint), ref.input_size,
                                              **ref.backbone_args())
        else:
            built = backbones.create_backbone(name, "false", "", ref.input_size, **ref.backbone_args())
    return built.eval_transform


def extract_features(cfg: RunConfig, ref: BackboneRef, data: TaskData, splits: Sequence[str]) -> dict[str, np.ndarray]:
    """Pooled backbone features float32 [N, D] per split, from the cache or one extraction pass
    over every split that is missing."""
    return extract_features_many(cfg, ref, [(data, splits)])[0]


def extract_features_many(
    cfg: RunConfig, ref: BackboneRef, requests: Sequence[tuple[TaskData, Sequence[str]]],
) -> list[dict[str, np.ndarray]]:
    """Features for several (task, splits) requests; everything not cached is extracted in ONE pass
    (in this process for few images, else Ray Data; see ``ray.in_process_max_rows``), so the
    backbone loads once however many tasks there are."""
    out: list[dict[str, np.ndarray]] = [{} for _ in requests]
    todo: dict[str, tuple[int, str, Split, str]] = {}  # cache uri -> (request, split, data, task)
    for index, (data, splits) in enumerate(requests):
        for split in splits:
            uri = _features_uri(cfg, ref, data.fingerprints[split])
            if cache.is_complete(uri):
                out[index][split] = _load_array(storage.join(uri, "features.npy"))
            else:
                todo.setdefault(uri, (index, split, data.splits[split], data.name))
    if todo:
        from pacl_ray.stages.runtime import init_ray

        items, offsets = [], {}
        for uri, (_, split, split_data, task) in todo.items():
            start = len(items)
            offsets[uri] = (start, start + len(split_data))
            items.extend([{"row": start + i, "path": p, "where": f"task {task!r} split {split!r} row {i}"}
                          for i, p in enumerate(split_data.paths)])
        extractor_kwargs = dict(backbone=ref.name, pretrained=ref.pretrained, checkpoint=ref.checkpoint,
                                input_size=ref.input_size, precision=cfg.evaluate.precision, feature_column="feature",
                                **ref.backbone_args())
        # One executor for every inference step (in this process for few images, else Ray Data:
        # decode in CPU tasks, the model in an actor pool), as the embed and scoring stages use it.
        init_ray(cfg.ray)
        extractor = ImageFeatureExtractor(**extractor_kwargs) if executor.runs_in_process(len(items), cfg.ray) else None
        udfs = [Udf(decode_images, {"transform": eval_transform(ref, extractor)}),
                Udf(ImageFeatureExtractor, extractor_kwargs, actor=True, instance=extractor)]
        table = run_udfs_on_table(
            pa.Table.from_pylist(items), udfs, pool=executor.actor_pool(cfg.evaluate),
            batch_size=cfg.evaluate.batch_size, ray_cfg=cfg.ray,
        )
        row_ids = table.column("row").to_numpy()
        if not np.array_equal(np.sort(row_ids), np.arange(len(items))):
            raise RuntimeError(f"feature extraction returned {len(row_ids)} rows for {len(items)} images")
        feature = table.column("feature").combine_chunks()
        chunks = [feature.flatten().to_numpy(zero_copy_only=False).reshape(len(row_ids), -1)]
        stacked = chunks[0][np.argsort(row_ids)].astype(np.float32)
        for uri, (_, split, _, task) in todo.items():
            start, stop = offsets[uri]
            _save_array(storage.join(uri, "features.npy"), stacked[start:stop])
            cache.mark_complete(uri, {"backbone": ref.name, "checkpoint": ref.checkpoint, "task": task,
                                      "split": split, "rows": stop - start, "dim": int(stacked.shape[1])})
        for index, (data, splits) in enumerate(requests):
            for split in splits:
                if split not in out[index]:
                    start, stop = offsets[_features_uri(cfg, ref, data.fingerprints[split])]
                    out[index][split] = stacked[start:stop]
    return out
