"""Stage 3's logs: the epoch table (empty phases included), the run log and TensorBoard on any storage."""

from __future__ import annotations

import math
import os

import pytest

from pacl_ray.stages.train_data import TrainingPlan
from pacl_ray.stages.train_metrics import RunLog, TensorBoardLog, epoch_table, plan_lines

PLAN = TrainingPlan(phases=[(1,), (1, 2, 3), (1, 2, 3, 4)], steps=[0, 0, 2], pairs=[0, 0, 16],
                    counts={1: 0, 2: 0, 3: 0, 4: 16}, global_batch=8)


def _row(step: int, total: float) -> dict:
    row = {"global_step": step, "epoch": 2, "phase": "1234", "L1": 0.0, "L2": 0.0, "L3": 0.0, "L4": total,
           "total": total, "samples_per_s": 10.0, "data_wait_s": 0.0, "lr_backbone": 1e-3, "amp_skipped": step}
    return {**row, **{f"share_{k}": float(k == 4) for k in (1, 2, 3, 4)}}


def test_epoch_table_says_which_epochs_took_no_step():
    table = epoch_table([_row(0, 2.0), _row(1, 1.0)], PLAN, [0, 1, 2])
    assert [r["steps"] for r in table] == [0, 0, 2] and [r["phase"] for r in table] == ["1", "123", "1234"]
    for row in table[:2]:
        assert "fewer than one global batch of 8: no step" in row["note"] and "4 weak-coupled: 16" in row["note"]
        assert math.isnan(row["total"]) and row["count_4"] == 16
    assert table[2]["note"] == "" and table[2]["total"] == 1.5 and table[2]["amp_skipped_steps"] == 1
    assert table[2]["pairs_in_phase"] == 16


def test_run_log_names_skipped_epochs_and_keeps_earlier_launches(tmp_path, capsys):
    first = RunLog(str(tmp_path))
    first.write(*plan_lines(PLAN))
    RunLog(str(tmp_path)).write("relaunched")
    lines = (tmp_path / "run.log").read_text().splitlines()
    assert lines[0].startswith("train: 2 global steps of 8 over 3 epochs; partition counts 1 strong-coupled: 0")
    assert lines[1].startswith("train: epoch 0: phase 1 holds 0 pairs") and lines[2].startswith("train: epoch 1: phase 123")
    assert lines[3] == "relaunched" and "train: epoch 0" in capsys.readouterr().out


def test_tensorboard_events_reach_a_file_uri_run_directory(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    log = TensorBoardLog("file://" + str(run))
    log.add_scalars({"train/total": 2.0}, 0)
    log.sync()  # what each checkpoint does
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    log.add_scalars({"train/total": 1.0}, 1)
    log.close()
    local = log.directory
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/total")] == [(0, 2.0), (1, 1.0)]
    assert local != str(run / "tensorboard") and not os.path.exists(local)  # written locally, copied, cleaned


def test_tensorboard_writes_a_local_run_directory_in_place(tmp_path):
    pytest.importorskip("tensorboard")
    log = TensorBoardLog(str(tmp_path))
    log.add_scalars({"train/total": 2.0}, 0)
    log.close()
    assert log.directory == str(tmp_path / "tensorboard") and list((tmp_path / "tensorboard").glob("events.*"))
