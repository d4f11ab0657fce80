"""Where the worker loop runs: the in-process launch's choice, checkpoints, resume lookup, retries.

The in-process training runs themselves (same result as Ray Train, failure recovery, a relaunch
on Ray Train) are in tests/stages/test_train.py.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from pacl_ray.stages.checkpoint import STATE_FILE, load_state
from pacl_ray.stages.train_launch import (
    COUNTERS_FILE, IN_PROCESS_DIR, KEEP_CHECKPOINTS, RAY_TRAIN_DIR, InProcessWorker, checkpoint_directory,
    latest_checkpoint, persist_checkpoint, run_with_retries, runs_in_process, torch_threads, worker_threads,
    write_counters,
)


def _local_checkpoint(tmp_path, step: int, counters: bool = True) -> str:
    directory = tmp_path / f"local-{step}"
    directory.mkdir()
    counters = {"epoch": 0, "step_in_epoch": step, "global_step": step}
    state = {"counters": counters, "model": {"w": torch.full((2,), step)}}
    torch.save(state, directory / STATE_FILE)
    if counters:
        write_counters(str(directory), state["counters"])
    return str(directory)


def test_only_one_cpu_worker_without_callbacks_runs_in_process():
    assert runs_in_process(1, None, False, None) and runs_in_process(1, 0, False, [])
    assert not runs_in_process(2, None, False, None)  # DDP on Ray Train
    assert not runs_in_process(1, 4, False, None)  # an elastic range
    assert not runs_in_process(1, None, True, None)  # a GPU worker
    assert not runs_in_process(1, None, False, [object()])  # e.g. Tune's report callback (ASHA)


def test_worker_threads_follow_the_worker_cpus_and_are_restored():
    assert worker_threads({}) == 1 and worker_threads({"CPU": 3}) == 3 and worker_threads({"CPU": 0.5}) == 1
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_persisted_checkpoints_keep_the_newest_and_resume_from_the_highest_step(tmp_path):
    run = str(tmp_path / "run")
    for step in (2, 4, 6):
        uri = persist_checkpoint(_local_checkpoint(tmp_path, step), run, step)
        assert uri == os.path.join(run, IN_PROCESS_DIR, f"step_{step:09d}")
    kept = sorted(os.listdir(os.path.join(run, IN_PROCESS_DIR)))
    assert kept == [f"step_{s:09d}" for s in (4, 6)] and KEEP_CHECKPOINTS == 2
    step, uri = latest_checkpoint(run)
    assert step == 6
    with checkpoint_directory(uri) as directory:
        assert torch.equal(load_state(directory)["model"]["w"], torch.full((2,), 6))
    # An unfinished copy (no counters.json: it is written last) is not a checkpoint.
    unfinished = os.path.join(run, IN_PROCESS_DIR, "step_000000008")
    os.makedirs(unfinished)
    torch.save({"counters": {"global_step": 8}}, os.path.join(unfinished, STATE_FILE))
    assert latest_checkpoint(run)[0] == 6


def test_latest_checkpoint_looks_in_ray_trains_directory_too(tmp_path):
    run = tmp_path / "run"
    assert latest_checkpoint(str(run)) is None
    persist_checkpoint(_local_checkpoint(tmp_path, 4), str(run), 4)
    ray_dir = run / RAY_TRAIN_DIR / "checkpoint_2026-01-01_00-00-00.000000"
    ray_dir.parent.mkdir(parents=True)
    os.rename(_local_checkpoint(tmp_path, 7), ray_dir)
    assert latest_checkpoint(str(run)) == (7, str(ray_dir))
    assert latest_checkpoint(str(run), kinds=(IN_PROCESS_DIR,))[0] == 4  # what a Ray Train launch is given
    # A Ray Train checkpoint from before counters.json: its state says the step.
    (ray_dir / COUNTERS_FILE).unlink()
    assert latest_checkpoint(str(run)) == (7, str(ray_dir))


def test_in_process_reports_persist_their_checkpoint(tmp_path):
    worker = InProcessWorker(str(tmp_path / "run"))
    assert (worker.rank, worker.world, worker.device.type) == (0, 1, "cpu") and worker.restored_state() is None
    worker.report({"global_step": 3, "total": 1.5})
    assert worker.metrics == {"global_step": 3, "total": 1.5} and worker.checkpoint is None
    worker.report({"global_step": 4, "total": 1.2}, checkpoint_dir=_local_checkpoint(tmp_path, 4))
    assert worker.checkpoint == os.path.join(str(tmp_path / "run"), IN_PROCESS_DIR, "step_000000004")
    assert json.load(open(os.path.join(worker.checkpoint, COUNTERS_FILE)))["global_step"] == 4


def test_retries_stop_after_max_failures():
    calls, lines = [], []

    def flaky(fail_times):
        def launch():
            calls.append(1)
            if len(calls) <= fail_times:
                raise RuntimeError(f"failure {len(calls)}")
            return "done"
        return launch

    assert run_with_retries(flaky(2), 2, lines.append) == "done" and len(calls) == 3
    assert lines[0].startswith("train: in-process launch failed (RuntimeError: failure 1); retry 1 of 2")
    calls.clear()
    with pytest.raises(RuntimeError, match="failure 2"):
        run_with_retries(flaky(5), 1, lines.append)
    calls.clear()
    assert run_with_retries(flaky(4), -1, lines.append) == "done"  # -1: no limit
    calls.clear()
    with pytest.raises(RuntimeError, match="failure 1"):
        run_with_retries(flaky(1), 0, lines.append)
