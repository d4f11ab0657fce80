"""pacl_ray.stages.scoring: the ANP vocabulary, the CLIP transform, and scoring through the real Ray
Data path and the small-input in-process path on the tiny CLIP and offline MiniLM (the chained
scores -> partition test, which compares both paths, is in test_partition.py)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY_CLIP
from PIL import Image

from pacl_ray.config import RunConfig
from pacl_ray.core.backbones import create_clip
from pacl_ray.stages import cache
from pacl_ray.stages.ingest import read_pairs_table, run_ingest
from pacl_ray.stages.scoring import anp_phrase, clip_eval_transform, load_anp_vocab, run_scoring

N_PAIRS = 24
TEXTS = ["what a lovely sunny day at the beach", "I hate this rainy grey street",
         "our cute dog is so happy", "scary storm over the city tonight"]


def write_manifest(directory, n=N_PAIRS, precomputed=False):
    rng = np.random.default_rng(0)
    (directory / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        pixels = rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / "img" / f"{i}.png")
        row = {"id": f"p{i}", "image": f"img/{i}.png", "text": TEXTS[i % 4], "planted_partition": i % 4 + 1}
        if precomputed or i == 0:
            row["anps"] = "happy dog; sunny beach; lovely sky"
        if precomputed:
            row.update(factual_score=float(rng.uniform(0, 0.4)), emotional_score=float(rng.uniform(0, 0.8)))
        rows.append(row)
    manifest = directory / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return manifest


def tiny_cfg(output_dir, manifest, minilm_path) -> RunConfig:
    cfg = RunConfig(output_dir=output_dir)
    cfg.ingest.manifest = str(manifest)
    p = cfg.partition
    p.clip_model, p.clip_pretrained = TINY_CLIP, ""
    p.sentiment_model, p.sentiment_pooling = minilm_path, "mean"
    p.precision, p.batch_size, p.concurrency, p.report_examples = "fp32", 8, 1, 2
    p.factual_calibration = p.emotional_calibration = "rank"
    p.sigma = 0.5
    return cfg


def test_default_vocab_and_phrase():
    vocab = load_anp_vocab()
    assert len(vocab) > 1000 and "happy dog" in vocab and not any(v.startswith("#") for v in vocab)
    assert anp_phrase("happy dog; sunny beach") == "happy dog, sunny beach"


def test_transform_matches_open_clip_preprocess():
    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    ours = clip_eval_transform(TINY_CLIP, "")(image)
    theirs = create_clip(TINY_CLIP, "").preprocess(image)
    assert ours.shape == (3, 32, 32)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("in_process_max_rows, executor", [(0, "ray_data"), (4096, "in_process")])
def test_precomputed_scores_skip_models(ray_local, tmp_path, output_dir, minilm_path, in_process_max_rows, executor):
    cfg = tiny_cfg(output_dir, write_manifest(tmp_path / "pre", n=8, precomputed=True), minilm_path)
    cfg.partition.clip_model = "no-such-model"  # proves CLIP is never built
    cfg.ray.in_process_max_rows = in_process_max_rows
    ingest = run_ingest(cfg)
    scores = run_scoring(cfg, ingest)
    summary = cache.read_summary(scores.uri)
    assert summary["ran_clip"] is False and summary["ran_sentiment"] is False and summary["executor"] == executor
    raw = pq.read_table(scores.path("raw_scores")).sort_by("id")
    pairs = read_pairs_table(ingest).sort_by("id")
    np.testing.assert_allclose(raw.column("factual_score").to_numpy(), pairs.column("factual_score").to_numpy())
