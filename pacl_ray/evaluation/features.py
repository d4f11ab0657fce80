"""Frozen features for evaluation: pooled backbone features float32 [N, D] per task split,
extracted once and cached by content key under ``{output_dir}/evaluate/features/``.

Extraction runs :class:`pacl_ray.stages.image_features.ImageFeatureExtractor` (the same UDF as the
embed stage, with the backbone's eval transform) over image paths: in a loop in this process for
at most ``ray.in_process_max_rows`` images (actor start-up would dominate), else in a Ray Data
callable-class actor pool (``evaluate.concurrency`` actors, ``evaluate.num_gpus`` each when the
cluster has GPUs). Every uncached split of every task goes through ONE pass, so the backbone loads
once however many tasks there are.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import pyarrow as pa

from pacl_ray.config import RunConfig
from pacl_ray.evaluation.datasets import Split, TaskData
from pacl_ray.evaluation.resolve import BackboneRef
from pacl_ray.formats import storage
from pacl_ray.stages import cache
from pacl_ray.stages.executor import ActorPool, Udf, run_udfs_on_table
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
        items, offsets = [], {}
        for uri, (_, _, split_data, _) in todo.items():
            start = len(items)
            offsets[uri] = (start, start + len(split_data))
            items.extend([{"row": start + i, "path": p} for i, p in enumerate(split_data.paths)])
        extractor_kwargs = dict(backbone=ref.name, pretrained=ref.pretrained, checkpoint=ref.checkpoint,
                                input_size=ref.input_size, precision=cfg.evaluate.precision, feature_column="feature",
                                **ref.backbone_args())
        # One executor for every inference step (in this process for few images, else a Ray Data
        # actor pool), as the embed and scoring stages use it.
        table = run_udfs_on_table(
            pa.Table.from_pylist(items), [Udf(ImageFeatureExtractor, extractor_kwargs, actor=True)],
            pool=ActorPool(cfg.evaluate.concurrency, cfg.evaluate.num_gpus), batch_size=cfg.evaluate.batch_size,
            ray_cfg=cfg.ray,
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
