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


def test_given_partitions_are_used_and_a_scores_only_change_reruns_only_scoring_and_partition(
        ray_local, tmp_path, output_dir, minilm_path, monkeypatch):
    """Issue 23: a ``partition`` column (1-4) is used as given, bad codes are quarantined, and a
    manifest that differs only in scores/partitions keeps the embed and cluster keys."""
    from pacl_ray.stages.embed import embed_key, run_embed
    from pacl_ray.stages.pseudo_labels import cluster_key

    first = write_manifest(tmp_path / "data", precomputed=True)
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    changed = []
    for i, row in enumerate(rows):
        row = dict(row, factual_score=row["factual_score"] / 2)  # other scores for every pair
        if i % 3 == 0:
            row["partition"] = 4 - i % 4
        if i == 3:  # a given partition needs no score at all
            for key in ("factual_score", "emotional_score", "anps"):
                row.pop(key)
        changed.append(row)
    changed += [dict(rows[1], id="bad-code", partition=7), dict(rows[2], id="bad-type", partition="x")]
    second = tmp_path / "data" / "second.jsonl"
    second.write_text("\n".join(json.dumps(r) for r in changed) + "\n")

    cfg_a = tiny_cfg(output_dir, first, minilm_path)
    cfg_b = tiny_cfg(output_dir, second, minilm_path)
    for cfg in (cfg_a, cfg_b):
        cfg.model.backbone, cfg.model.backbone_pretrained, cfg.model.backbone_input_size = "test_resnet", "false", 32
        cfg.model.text_encoder, cfg.model.text_pooling = minilm_path, "mean"
    ingest_a, ingest_b = run_ingest(cfg_a), run_ingest(cfg_b)
    assert ingest_a.key != ingest_b.key
    summary_b = cache.read_summary(ingest_b.uri)
    assert summary_b["pairs"] == N_PAIRS and summary_b["quarantine_reasons"] == {"bad_value": 2}
    quarantine = pq.read_table(ingest_b.path("quarantine")).to_pylist()
    assert {(q["id"], q["field"]) for q in quarantine} == {("bad-code", "partition"), ("bad-type", "partition")}
    assert "must be 1-4, got 7" in next(q["detail"] for q in quarantine if q["id"] == "bad-code")

    # Same ids, images and texts: embedding (and so clustering) is keyed the same and not re-run.
    assert embed_key(cfg_a, ingest_a) == embed_key(cfg_b, ingest_b)
    embed_a = run_embed(cfg_a, ingest_a)
    embed_b = run_embed(cfg_b, ingest_b)
    assert not embed_a.cached and embed_b.cached and embed_b.key == embed_a.key
    assert cluster_key(cfg_a, embed_a) == cluster_key(cfg_b, embed_b)
    # Architecture and transform settings are part of the embed key.
    import dataclasses

    for change in ({"backbone_kwargs": {"drop_path_rate": 0.1}}, {"crop_pct": 1.0}, {"interpolation": "bicubic"}):
        changed_cfg = dataclasses.replace(cfg_a, model=dataclasses.replace(cfg_a.model, **change))
        assert embed_key(changed_cfg, ingest_a) != embed_key(cfg_a, ingest_a), change
    # ... while scoring and partitioning re-run, without any model (scores or partitions are given).

    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(scoring_mod.ClipScorer, "__init__", no_models)
    monkeypatch.setattr(scoring_mod.SentimentScorer, "__init__", no_models)
    scores_a, scores_b = run_scoring(cfg_a, ingest_a), run_scoring(cfg_b, ingest_b)
    assert scores_a.key != scores_b.key and not scores_b.cached
    part_a, part_b = run_partition(cfg_a, scores_a), run_partition(cfg_b, scores_b)
    assert part_a.key != part_b.key

    codes = dict(zip(*(read_scores(part_b).sort_by("id").column(c).to_pylist() for c in ("id", "partition"))))
    given = {r["id"]: r["partition"] for r in changed[:N_PAIRS] if "partition" in r}
    assert given and all(codes[k] == v for k, v in given.items())  # used as given
    report = json.loads(storage_text(part_b, "report.json"))
    assert report["given_partitions"] == len(given)
    # The other pairs are thresholded on their own scores (rank calibration over the scored pairs).
    raw = read_scores(part_b).sort_by("id").to_pylist()
    scored = [r for r in raw if r["id"] not in given]
    factual = np.array([r["factual_score"] for r in scored])
    emotional = np.array([r["emotional_score"] for r in scored])
    expected = [(1 if e else 3) if f else (2 if e else 4) for f, e in zip(
        [(factual <= x).mean() > 0.5 for x in factual], [(emotional <= x).mean() > 0.5 for x in emotional])]
    assert [r["partition"] for r in scored] == expected
    assert np.isnan(next(r["factual_score"] for r in raw if r["id"] == "p3"))  # given, never scored


def storage_text(stage, name: str) -> str:
    from pacl_ray.formats import storage

    return storage.read_text(stage.path(name))


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
