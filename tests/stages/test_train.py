"""Stage 3 on Ray Train: worker-count invariance, failure recovery, phases, export, caching.

The equivalence tests use ``test_convnext`` (LayerNorm only); BatchNorm backbones agree across
worker counts through ``train.sync_batchnorm`` (tested without Ray in tests/core/test_dist.py).
Runs are shared by the module's tests (a trainer start costs seconds).
"""

from __future__ import annotations

import glob
import json
import os

import sys

import numpy as np
import pytest
import ray.cloudpickle
import timm
import torch
from ray.train import UserCallback

from pacl_ray import config
from pacl_ray.world import stage_tables
from pacl_ray.stages.cache import StageOutput
from pacl_ray.config import model_args
from pacl_ray.stages.checkpoint import STATE_FILE
from pacl_ray.core.pacl_model import build_model
from pacl_ray.stages.train import (
    FaultInjection, NonFiniteLossError, chunk_layout, feed_order, fits_in_memory, joined_table, load_state,
    load_training_table, rank_batches, run_train, write_feed,
)
from pacl_ray.stages.validation import Validator
from test_validation import probe_set

pytestmark = pytest.mark.timeout(900)  # Ray Train starts are slow on a shared, loaded 2-core machine

TINY = "test_convnext"
CODES = [1] * 8 + [2] * 8 + [3] * 8 + [4] * 8  # 32 pairs; batch 8 -> 1 + 3 + 4 steps over 3 epochs
TEXT_DIM = 16
TOTAL_STEPS = 8


def write_stage_tables(root, codes=CODES, text_dim=TEXT_DIM, seed=0) -> dict[str, StageOutput]:
    """The four upstream tables (Parquet) of a tiny world, as StageOutputs."""
    return stage_tables.write_stage_tables(root, codes, text_dim, seed=seed)


def make_cfg(output_dir, partition=None, **train) -> config.RunConfig:
    return config.from_dict({
        "output_dir": str(output_dir), "seed": 3, "partition": dict(partition or {}),
        "model": {"backbone": TINY, "backbone_pretrained": "false", "embed_dim": 16},
        "train": {"epochs": 3, "global_batch_size": 8, "image_size": 32, "lr_backbone": 1e-3,
                  "checkpoint_every_steps": 2, "log_every_steps": 4, "num_workers": 1, **train},
    })


def _run(tables, cfg, fault=None, **kwargs):
    return run_train(cfg, tables["ingest"], tables["partition"], tables["embed"], tables["cluster"], fault=fault,
                     **kwargs)


class ReportLog(UserCallback):
    """Ray Train callback (on the controller): appends rank 0's metrics of every report to a JSONL file."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as handle:
            handle.write(json.dumps({k: v for k, v in metrics[0].items() if isinstance(v, (int, float))}) + "\n")


def _final_state(result):
    return load_state(result.checkpoint)


def _run_dirs(output_dir) -> list[str]:
    return sorted(glob.glob(os.path.join(str(output_dir), "stages", "train", "*")))


def _latest_checkpoint_state(output_dir, kind: str = "ray_train") -> dict:
    (run,) = _run_dirs(output_dir)
    states = [load_state(os.path.dirname(p)) for p in glob.glob(os.path.join(run, kind, "*", STATE_FILE))]
    return max(states, key=lambda s: s["counters"]["global_step"])


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    return write_stage_tables(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def runs(ray_local, tables, tmp_path_factory):
    """An uninterrupted 1-worker run and a 2-worker run whose rank 1 dies once mid-epoch (before
    global step 7; the latest checkpoint is at step 6, inside the last epoch). The 2-worker run
    doubles as the 1-vs-2 comparison: its replayed steps are recomputed, so a lost or repeated
    step would show in both its step log and its parameters. The 1-worker run streams its data
    through Ray Data every epoch (from the feed files), the 2-worker run batches an in-memory copy,
    so the comparison also checks that both data paths train the same."""
    base = tmp_path_factory.mktemp("runs")
    marker = str(base / "fault-marker")
    reports = str(base / "reports.jsonl")
    # Both runs probe a held-out labelled set at each epoch's end (stages.validation, issue 20).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # ReportLog, on Ray Train's controller
    return {
        "one": _run(tables, make_cfg(base / "one", in_memory_max_mb=0), validation=probe_set(),
                    callbacks=[ReportLog(reports)]),
        "two": _run(tables, make_cfg(base / "two", num_workers=2, max_failures=2), FaultInjection(step=7, marker=marker),
                    validation=probe_set()),
        "marker": marker, "reports": reports,
    }


# --------------------------------------------------------------------------- Ray Train runs


@pytest.mark.parametrize("rank, start_step, chunk_rows", [(0, 0, 1), (1, 2, 3)])
def test_in_memory_batches_equal_streamed_batches(ray_local, tables, tmp_path, rank, start_step, chunk_rows):
    cfg = make_cfg("unused")
    meta = load_training_table(tables["ingest"], tables["partition"], tables["embed"], tables["cluster"], cfg.train.k)
    pairs = tables["ingest"].path("pairs")
    layout = chunk_layout(pairs, meta.column("id").to_numpy(zero_copy_only=False).astype(str), chunk_rows)
    files = write_feed("file://" + str(tmp_path / "feed"), pairs, meta.drop_columns(["partition"]), chunk_rows)
    order = feed_order(meta.column("partition").to_numpy(), 8, 5, 16, layout)
    _, backbone = build_model(TEXT_DIM, **model_args(cfg))
    plan = dict(order=order, phase=(1, 2, 3, 4), epoch=2, start_step=start_step, rank=rank, world_size=2,
                transform=backbone.train_transform, device=torch.device("cpu"))
    read_bytes: list[int] = []
    streamed = list(rank_batches(files, **plan, read_bytes=read_bytes))
    in_memory = list(rank_batches(joined_table(tables["ingest"], meta), **plan))
    steps = order.steps((1, 2, 3, 4), 2)  # 4 with one-row chunks; 3-row chunks leave the 8 shards uneven
    assert steps == (4 if chunk_rows == 1 else 3)
    assert len(streamed) == len(in_memory) == steps - start_step and sum(read_bytes) > 0
    for a, b in zip(streamed, in_memory):
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype, name
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert (torch.cat([b["position"] for b in in_memory]) // 8).tolist() == [s for s in range(start_step, steps) for _ in range(4)]


def test_fits_in_memory_compares_the_pairs_files_with_the_limit(tables):
    assert fits_in_memory(tables["ingest"], 1.0)  # 32 noise images of 40 px: a few hundred KB
    assert not fits_in_memory(tables["ingest"], 0.0)
    assert not fits_in_memory(tables["ingest"], 1e-3)


def _steps(result):
    return _final_state(result)["step_rows"]


def test_one_and_two_workers_agree(runs):
    one, two = _steps(runs["one"]), _steps(runs["two"])
    assert [r["global_step"] for r in one] == [r["global_step"] for r in two] == list(range(TOTAL_STEPS))
    np.testing.assert_allclose([r["total"] for r in two], [r["total"] for r in one], rtol=1e-5)
    state_one, state_two = _final_state(runs["one"])["model"], _final_state(runs["two"])["model"]
    for name, value in state_one.items():
        torch.testing.assert_close(state_two[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_worker_failure_resumes_exactly(runs):
    assert os.path.exists(runs["marker"])  # rank 1 did fail once
    state = _final_state(runs["two"])
    assert state["counters"]["global_step"] == TOTAL_STEPS
    assert [r["global_step"] for r in state["step_rows"]] == list(range(TOTAL_STEPS))  # none lost or repeated
    assert runs["two"].final_metrics["total_steps"] == TOTAL_STEPS


def test_phase_boundaries(runs):
    rows = _steps(runs["one"])
    for r in rows:
        present = {k for k in (1, 2, 3, 4) if r[f"share_{k}"] > 0}
        expected = {0: {1}, 1: {1, 2, 3}, 2: {1, 2, 3, 4}}[r["epoch"]]
        assert present <= expected
        active = sorted(expected)
        assert r["total"] == pytest.approx(sum(r[f"L{k}"] for k in active), rel=1e-6)
        for k in set((1, 2, 3, 4)) - expected:
            assert r[f"L{k}"] == 0.0
    assert {k for r in rows if r["epoch"] == 2 for k in (1, 2, 3, 4) if r[f"share_{k}"] > 0} == {1, 2, 3, 4}
    history = runs["one"].history
    assert [h["phase"] for h in history] == ["1", "123", "1234"]
    assert [h["steps"] for h in history] == [1, 3, 4]


def test_metric_logs_written(runs):
    uri = runs["one"].uri
    header = open(os.path.join(uri, "metrics_steps.csv")).readline().strip().split(",")
    for column in ("L1", "L2", "L3", "L4", "total", "share_1", "share_4", "lr_backbone", "lr_heads", "samples_per_s"):
        assert column in header
    assert len(open(os.path.join(uri, "metrics_epochs.csv")).read().strip().splitlines()) == 1 + 3
    rows = _steps(runs["one"])
    assert rows[0]["lr_backbone"] == pytest.approx(1e-3) and rows[-1]["lr_backbone"] < rows[0]["lr_backbone"]


def test_validation_probe_is_reported_with_every_checkpoint(runs):
    reports = [json.loads(line) for line in open(runs["reports"])]
    # checkpoints every 2 steps and at each epoch's end (global steps 1 | 4 | 8)
    assert [r["global_step"] for r in reports] == [1, 2, 4, 6, 8]  # steps done when reported
    epoch_ends = [r for r in reports if r["step_in_epoch"] == 0]
    assert [r["epoch"] for r in epoch_ends] == [1, 2, 3]
    assert all(0 <= r["val_acc"] <= 100 for r in epoch_ends)
    # a report between two probes carries the latest one
    by_step = {r["global_step"]: r["val_acc"] for r in reports}
    assert by_step[2] == by_step[1] and by_step[6] == by_step[4]
    # kept in the step rows, the epoch table, the metric CSVs and TensorBoard
    history = runs["one"].history
    assert [h["val_acc"] for h in history] == [by_step[1], by_step[4], by_step[8]]
    header = open(os.path.join(runs["one"].uri, "metrics_epochs.csv")).readline().strip().split(",")
    assert "val_acc" in header
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(runs["one"].uri, "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/acc")] == [
        (s, pytest.approx(by_step[s])) for s in (1, 4, 8)]
    # the reported value is the probe of the final model, recomputed here
    cfg = make_cfg("unused")
    model, backbone = build_model(TEXT_DIM, **model_args(cfg))
    model.load_state_dict(_final_state(runs["one"])["model"])
    assert Validator(probe_set(), backbone.eval_transform, torch.device("cpu")).accuracy(model.backbone) == \
        pytest.approx(by_step[8])
    # 2 workers (and a resume from a checkpoint) probe the same model: the same values
    np.testing.assert_allclose([h["val_acc"] for h in runs["two"].history], [h["val_acc"] for h in history])


def test_exported_backbone_matches_trained_model(runs):
    result = runs["one"]
    cfg = make_cfg("unused")
    model, _ = build_model(TEXT_DIM, **model_args(cfg))
    model.load_state_dict(_final_state(result)["model"])
    model.eval()
    loaded = timm.create_model(TINY, pretrained=True, num_classes=0,
                               pretrained_cfg_overlay=dict(file=result.backbone_checkpoint)).eval()
    timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=result.backbone_checkpoint))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model.backbone(images), rtol=0, atol=0)


def test_complete_run_is_cached(runs, tables):
    cfg = make_cfg(os.path.dirname(os.path.dirname(os.path.dirname(runs["one"].uri))), in_memory_max_mb=0)
    again = _run(tables, cfg)
    assert again.cached and again.uri == runs["one"].uri and again.history == runs["one"].history


@pytest.mark.slow  # two more Ray Train runs (~90 s); the in-run failure test above covers resume in CI
def test_interrupted_run_relaunched_continues(ray_local, tables, runs, tmp_path):
    cfg = make_cfg(tmp_path / "relaunch", max_failures=0, in_memory_max_mb=0)
    with pytest.raises(Exception, match="injected failure"):
        _run(tables, cfg, FaultInjection(step=5, rank=0, marker=str(tmp_path / "marker")))
    crashed = _latest_checkpoint_state(tmp_path / "relaunch")
    assert crashed["counters"]["global_step"] == 4
    # Relaunched with different operational settings: same run directory, resumed from its checkpoint.
    relaunch = make_cfg(tmp_path / "relaunch", max_failures=5, in_memory_max_mb=256, log_every_steps=1,
                        checkpoint_every_steps=3)
    result = _run(tables, relaunch)
    state = _final_state(result)
    assert result.uri == _run_dirs(tmp_path / "relaunch")[0]
    assert [r["global_step"] for r in state["step_rows"]] == list(range(TOTAL_STEPS))
    assert state["step_rows"][:4] == crashed["step_rows"]  # carried over (wall-clock times included), not re-run
    assert f"train: resuming from the checkpoint at global step 4 of {TOTAL_STEPS}" in \
        open(os.path.join(result.uri, "run.log")).read()
    clean = _final_state(runs["one"])["model"]
    for name, value in state["model"].items():
        assert torch.equal(value, clean[name]), name


# --------------------------------------------------------------------------- in-process launches


def _assert_same_training(result, reference):
    state, clean = _final_state(result), _final_state(reference)
    assert [r["global_step"] for r in state["step_rows"]] == list(range(TOTAL_STEPS))
    assert [r["total"] for r in state["step_rows"]] == [r["total"] for r in clean["step_rows"]]
    for name, value in state["model"].items():
        assert torch.equal(value, clean["model"][name]), name


def test_in_process_run_equals_the_ray_train_run(ray_local, tables, runs, tmp_path):
    """One CPU worker in the calling process (a sweep trial's launch) trains bitwise as Ray
    Train's one worker, persists its checkpoints in the run directory and reports its start-up."""
    result = _run(tables, make_cfg(tmp_path / "inproc", in_memory_max_mb=0), in_process=True)
    _assert_same_training(result, runs["one"])
    assert not os.path.exists(os.path.join(result.uri, "ray_train"))  # no Ray Train run
    assert sorted(os.listdir(os.path.join(result.uri, "checkpoints"))) == ["step_000000006", "step_000000008"]
    assert os.path.isdir(result.checkpoint) and result.checkpoint.startswith(result.uri)
    startup = result.final_metrics
    assert startup["start_to_first_step_s"] == pytest.approx(
        startup["driver_setup_s"] + startup["worker_start_s"] + startup["worker_to_first_step_s"])
    assert "train: first step" in open(os.path.join(result.uri, "run.log")).read()


def test_in_process_failure_resumes_exactly(ray_local, tables, runs, tmp_path):
    marker = str(tmp_path / "marker")
    result = _run(tables, make_cfg(tmp_path / "retry", max_failures=1), FaultInjection(step=5, rank=0, marker=marker),
                  in_process=True)
    assert os.path.exists(marker)  # it did fail once, and was retried from the step-4 checkpoint
    _assert_same_training(result, runs["one"])
    assert "in-process launch failed (RuntimeError: injected failure" in open(os.path.join(result.uri, "run.log")).read()


@pytest.mark.slow  # one more Ray Train run
def test_in_process_crash_relaunched_on_ray_train_continues(ray_local, tables, runs, tmp_path):
    """A run that crashed in process resumes from its checkpoint when relaunched on Ray Train."""
    with pytest.raises(RuntimeError, match="injected failure"):
        _run(tables, make_cfg(tmp_path / "switch", max_failures=0, in_memory_max_mb=0),
             FaultInjection(step=5, rank=0, marker=str(tmp_path / "marker")), in_process=True)
    crashed = _latest_checkpoint_state(tmp_path / "switch", "checkpoints")
    assert crashed["counters"]["global_step"] == 4
    result = _run(tables, make_cfg(tmp_path / "switch", in_memory_max_mb=0))  # Ray Train, one worker
    _assert_same_training(result, runs["one"])
    assert _final_state(result)["step_rows"][:4] == crashed["step_rows"]  # carried over, not re-run


def test_success_record_holds_no_output_dir(runs):
    summary = open(os.path.join(runs["one"].uri, "_SUCCESS")).read()
    assert os.path.dirname(runs["one"].uri) not in summary  # paths relative to the run directory
    assert os.path.exists(runs["one"].backbone_checkpoint) and os.path.isdir(runs["one"].checkpoint)


def test_non_finite_loss_stops_the_run(ray_local, tables, tmp_path):
    cfg = make_cfg(tmp_path / "nan", temperature=1e-40, max_failures=2)  # sim / tau overflows float32
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at global step 0 \(epoch 0, phase 1\): L1=nan, "
                                                 r".*total=nan; train.temperature=1e-40.*no checkpoint was saved"):
        _run(tables, cfg)
    (run,) = _run_dirs(tmp_path / "nan")
    assert not os.path.exists(os.path.join(run, "_SUCCESS")) and not os.path.exists(os.path.join(run, "export"))
    assert json.load(open(os.path.join(run, "nonfinite_loss.json")))["global_step"] == 0
    assert "non-finite loss at global step 0" in open(os.path.join(run, "run.log")).read()


@pytest.mark.parametrize("sigma", [1, pytest.param(0.9, marks=pytest.mark.slow), pytest.param(0, marks=pytest.mark.slow)])
def test_table5_sigma_trials_train(ray_local, tmp_path, sigma):
    """SPEC "Choice (empty phases)": the sigma ends of Table 5 train; empty epochs are logged."""
    from test_train_data import table5_codes

    codes = table5_codes(sigma)
    world = write_stage_tables(tmp_path / "world", codes=list(codes))
    cfg = make_cfg(tmp_path / "out", partition={"sigma": sigma})
    result = _run(world, cfg)
    expected = {1: [0, 0, 4], 0.9: [0, 0, 4], 0: [4, 4, 4]}[sigma]
    assert [h["steps"] for h in result.history] == expected
    assert result.final_metrics["total_steps"] == sum(expected) and os.path.exists(result.backbone_checkpoint)
    assert result.final_metrics["skipped_epochs"] == expected.count(0)
    log = open(os.path.join(result.uri, "run.log")).read()
    for epoch, steps in enumerate(expected):
        note = result.history[epoch]["note"]
        assert bool(note) == (steps == 0)
        if steps == 0:
            assert f"epoch {epoch}: {note}" in log and f"4 weak-coupled: {int((codes == 4).sum())}" in note
    table = open(os.path.join(result.uri, "metrics_epochs.csv")).read().splitlines()
    assert len(table) == 1 + 3 and "note" in table[0].split(",") and "count_4" in table[0].split(",")
