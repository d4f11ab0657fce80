"""pacl_ray.stages.partition: thresholding stored scores, reports and caching, chained after scoring
through the real Ray Data path and the small-input in-process path (tiny CLIP, offline MiniLM)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_scoring import N_PAIRS, tiny_cfg, write_manifest

from pacl_ray.config import RunConfig
from pacl_ray.formats import tables
from pacl_ray.stages import cache
from pacl_ray.stages import scoring as scoring_mod
from pacl_ray.stages.ingest import read_pairs_table, run_ingest
from pacl_ray.stages.partition import read_scores, run_partition, split_report
from pacl_ray.stages.scoring import RAW_SCORES, load_anp_vocab, run_scoring, score_table_locally


def test_split_report_hand_case():
    cfg = RunConfig().partition
    report = split_report(np.array([1, 1, 2, 4], np.int8), cfg, planted=np.array([1, 2, 2, 0]))
    assert report["partitions"]["1"] == {"name": "strong-coupled", "count": 2, "percent": 50.0}
    assert report["partitions"]["3"]["count"] == 0
    assert report["planted_agreement"]["pairs"] == 3
    assert report["planted_agreement"]["accuracy"] == pytest.approx(2 / 3, abs=1e-4)


def test_scoring_and_partition_on_ray(ray_local, tmp_path, output_dir, minilm_path, monkeypatch, capsys):
    cfg = tiny_cfg(output_dir, write_manifest(tmp_path / "data"), minilm_path)
    cfg.ray.in_process_max_rows = 0  # the Ray Data pipeline, however small the input
    ingest = run_ingest(cfg)
    scores = run_scoring(cfg, ingest)
    assert scores.stage == "scores" and not scores.cached
    summary = cache.read_summary(scores.uri)
    assert summary["ran_clip"] is True and summary["executor"] == "ray_data"
    raw = pq.read_table(scores.path("raw_scores")).cast(RAW_SCORES).sort_by("id")
    assert raw.num_rows == N_PAIRS
    factual = raw.column("factual_score").to_numpy()
    emotional = raw.column("emotional_score").to_numpy()
    assert np.all(np.abs(factual) <= 1.0 + 1e-5) and np.all(np.abs(emotional) <= 1.0 + 1e-5)
    vocab = set(load_anp_vocab())
    anps = dict(zip(raw.column("id").to_pylist(), raw.column("anps").to_pylist()))
    assert anps["p0"] == "happy dog; sunny beach; lovely sky"  # the given column wins
    assert all(len(a.split("; ")) == 3 and set(a.split("; ")) <= vocab for k, a in anps.items() if k != "p0")

    # The Ray Data pipeline computes exactly what a plain loop over the same UDFs computes.
    local = score_table_locally(read_pairs_table(ingest), cfg.partition, load_anp_vocab()).sort_by("id")
    np.testing.assert_allclose(local.column("factual_score").to_numpy(), factual, atol=1e-5)
    np.testing.assert_allclose(local.column("emotional_score").to_numpy(), emotional, atol=1e-5)
    assert local.column("anps").to_pylist() == raw.column("anps").to_pylist()

    # The small-input path (the same UDFs in this process) stores the same scores.
    small = tiny_cfg(str(tmp_path / "in_process_runs"), cfg.ingest.manifest, minilm_path)
    small_scores = run_scoring(small, run_ingest(small))
    assert cache.read_summary(small_scores.uri)["executor"] == "in_process"
    assert small_scores.key == scores.key  # the executor is not part of the content
    small_raw = pq.read_table(small_scores.path("raw_scores")).cast(RAW_SCORES).sort_by("id")
    np.testing.assert_allclose(small_raw.column("factual_score").to_numpy(), factual, atol=1e-5)
    np.testing.assert_allclose(small_raw.column("emotional_score").to_numpy(), emotional, atol=1e-5)
    assert small_raw.column("anps").to_pylist() == raw.column("anps").to_pylist()
    capsys.readouterr()

    part = run_partition(cfg, scores)
    printed = capsys.readouterr().out
    assert "strong-coupled" in printed and "planted vs assigned" in printed
    table = read_scores(part)
    assert table.schema.equals(tables.SCORES, check_metadata=False) and table.num_rows == N_PAIRS
    report = json.loads((tmp_path / "runs").joinpath(part.uri, "report.json").read_text())
    assert sum(p["count"] for p in report["partitions"].values()) == N_PAIRS
    assert report["planted_agreement"]["pairs"] == N_PAIRS
    png = (tmp_path / "runs" / part.uri / "histograms.png").read_bytes()
    assert Image.open(io.BytesIO(png)).format == "PNG"
    gallery = (tmp_path / "runs" / part.uri / "gallery.html").read_text()
    assert gallery.count("data:image/jpeg;base64,") == sum(min(2, p["count"]) for p in report["partitions"].values())

    # Cached: same inputs and config are no-ops; a new sigma re-thresholds without any model.
    assert run_ingest(cfg).cached and run_scoring(cfg, ingest).cached and run_partition(cfg, scores).cached

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(scoring_mod.ClipScorer, "__init__", no_models)
    monkeypatch.setattr(scoring_mod.SentimentScorer, "__init__", no_models)
    cfg.partition.sigma = 0.9
    scores_again = run_scoring(cfg, run_ingest(cfg))
    assert scores_again.cached and scores_again.key == scores.key
    swept = run_partition(cfg, scores_again)
    assert not swept.cached and swept.key != part.key
    # rank > 0.9: pairs whose score is >= that of more than 90% of the pairs (brute force)
    swept_table = read_scores(swept).sort_by("id")
    codes = swept_table.column("partition").to_numpy()
    factual_matched = np.array([(factual <= f).mean() > 0.9 for f in factual])
    emotional_matched = np.array([(emotional <= e).mean() > 0.9 for e in emotional])
    assert factual_matched.sum() >= 1
    np.testing.assert_array_equal(np.isin(codes, (1, 3)), factual_matched)
    np.testing.assert_array_equal(np.isin(codes, (1, 2)), emotional_matched)


def test_raw_threshold_and_gallery_upscaling():
    import base64
    import io

    import numpy as np
    from PIL import Image

    from pacl_ray.stages.partition import _thumbnail_base64, raw_threshold

    raw = np.array([0.10, 0.20, 0.30, 0.40])
    calibrated = np.array([0.25, 0.50, 0.75, 1.00])  # a rank calibration
    assert raw_threshold(raw, calibrated, 0.5) == pytest.approx(0.25)  # between 0.2 (<= sigma) and 0.3
    assert raw_threshold(raw, calibrated, 1.0) is None  # nobody above: nothing to mark
    small = io.BytesIO()
    Image.new("RGB", (32, 16), (200, 10, 10)).save(small, "PNG")
    shown = Image.open(io.BytesIO(base64.b64decode(_thumbnail_base64(small.getvalue(), size=160))))
    assert shown.size == (160, 80)  # upscaled to the gallery's size, aspect kept
