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
    p.precision, p.batch_size, p.max_actors, p.report_examples = "fp32", 8, 1, 2
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


def test_pairs_with_a_given_partition_need_no_model_and_keep_their_code(tmp_path):
    """Issue 23: a ``partition`` given in the manifest needs no score; the code is carried into
    RAW_SCORES (missing scores as NaN)."""
    import pyarrow as pa

    from pacl_ray.stages.scoring import RAW_SCORES, _needed_models, to_raw_scores

    def pairs(partition, factual, emotional, anps):
        path = tmp_path / f"pairs-{len(list(tmp_path.iterdir()))}.parquet"
        pq.write_table(pa.table({"factual_score": pa.array(factual, pa.float32()),
                                 "emotional_score": pa.array(emotional, pa.float32()),
                                 "anps": pa.array(anps, pa.string()), "partition": pa.array(partition, pa.int8())}),
                       path)
        return [str(path)]

    assert _needed_models(pairs([2, 3], [None, None], [None, None], [None, None])) == (False, False)
    assert _needed_models(pairs([2, None], [None, 0.1], [None, None], [None, "happy dog"])) == (False, True)
    assert _needed_models(pairs([None, 1], [None, None], [0.3, None], [None, None])) == (True, False)
    batch = {"id": np.array(["a", "b"], dtype=object), "factual_score": np.array([None, 0.2], dtype=object),
             "emotional_score": np.array([None, 0.5], dtype=object), "anps": np.array([None, "x"], dtype=object),
             "planted_partition": np.array([None, 1], dtype=object), "partition": np.array([4, None], dtype=object)}
    table = to_raw_scores(batch)
    assert table.schema.equals(RAW_SCORES)
    assert table.column("partition").to_pylist() == [4, None]
    assert np.isnan(table.column("factual_score").to_pylist()[0]) and table.column("planted_partition").to_pylist() == [None, 1]


def test_scoring_models_that_cannot_load_name_their_partition_keys(monkeypatch, capfd):
    """Offline without the weights cached: each scorer raises ModelLoadError (one line, the model,
    its partition.* key, the reason, the fix) and open_clip's "ERROR:root" line is not printed."""
    import open_clip.factory
    import transformers
    from huggingface_hub.errors import LocalEntryNotFoundError

    from pacl_ray.core.backbones import ModelLoadError
    from pacl_ray.stages.scoring import ClipScorer, SentimentScorer

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we cannot "
                                      "find the requested files in the local cache.")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        ClipScorer("ViT-B-32", "openai", ["happy dog"], top_k=1, precision="fp32")
    message = str(info.value)
    assert message.startswith("partition.clip_model='ViT-B-32' (partition.clip_pretrained='openai'): ")
    assert "not in the local cache" in message and "HF_HUB_OFFLINE=1" in message and "\n" not in message
    with pytest.raises(ModelLoadError) as info:
        SentimentScorer("finiteautomata/bertweet-base-sentiment-analysis", "cls", "fp32")
    assert str(info.value).startswith("partition.sentiment_model='finiteautomata/bertweet-base-sentiment-analysis': ")
    captured = capfd.readouterr()
    assert "ERROR:root" not in captured.out + captured.err


def test_a_missing_clip_checkpoint_file_names_partition_clip_pretrained(tmp_path):
    from pacl_ray.core.backbones import ModelLoadError
    from pacl_ray.stages.scoring import ClipScorer

    missing = str(tmp_path / "clip.safetensors")
    with pytest.raises(ModelLoadError) as info:
        ClipScorer(TINY_CLIP, missing, ["happy dog"], top_k=1, precision="fp32")
    message = str(info.value)
    assert message.startswith(f"partition.clip_model='{TINY_CLIP}' (partition.clip_pretrained='{missing}'): ")
    assert "not a known tag or valid file path" in message


def test_scoring_models_are_checked_on_the_driver_before_actors_start(monkeypatch, tmp_path, minilm_path):
    """Actors that fail to load are retried by Ray with a long traceback; the driver checks first."""
    import open_clip
    import transformers
    from huggingface_hub.errors import LocalEntryNotFoundError

    from pacl_ray.core.backbones import ModelLoadError
    from pacl_ray.stages.scoring import check_scoring_models

    cfg = tiny_cfg(str(tmp_path / "out"), tmp_path / "m.jsonl", minilm_path)
    check_scoring_models(cfg.partition, True, True)  # random-init CLIP and a local directory: nothing to fetch

    def offline(*args, **kwargs):
        try:
            raise LocalEntryNotFoundError("we cannot find the requested files in the local cache.")
        except FileNotFoundError as err:  # how open_clip re-raises it
            raise FileNotFoundError("Failed to download file (open_clip_pytorch_model.bin)") from err

    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    cfg.partition.clip_model, cfg.partition.clip_pretrained = "ViT-B-32", "openai"
    with pytest.raises(ModelLoadError, match=r"^partition\.clip_model='ViT-B-32' \(partition\.clip_pretrained="
                                             r"'openai'\): cannot load the model: its weights are not in the local cache"):
        check_scoring_models(cfg.partition, True, False)
    check_scoring_models(cfg.partition, False, False)  # a model that will not run is not checked
    cfg.partition.sentiment_model = "org/sentiment"
    with pytest.raises(ModelLoadError, match=r"^partition\.sentiment_model='org/sentiment': .*local cache"):
        check_scoring_models(cfg.partition, False, True)
    cfg.partition.clip_pretrained = "opnai"
    with pytest.raises(ModelLoadError, match=r"'opnai' is neither a known tag of ViT-B-32 \(openai"):
        check_scoring_models(cfg.partition, True, False)
