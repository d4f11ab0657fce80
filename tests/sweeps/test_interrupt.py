"""An interrupted sweep never looks finished: Ctrl-C or SIGTERM while trials run exits 130 / 143 with
the resume line, marks the report INCOMPLETE and writes no best config; the same command resumes.

The unit tests below check each piece without Ray; the two ``slow`` tests run ``python -m
pacl_ray.tune`` on the tiny world as a subprocess and signal it once a trial has started."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pacl_ray import cli
from pacl_ray.formats import storage
from pacl_ray.stages import runtime
from pacl_ray.sweeps import driver
from pacl_ray.sweeps import report as sweep_report

from test_driver import sigma_outcomes  # tests/sweeps is on sys.path (rootdir conftest, no packages)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def restore_signals():
    """main() installs the stop handlers in this (pytest's) process: put pytest's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
    runtime._stop.received = 0


class Result:  # what collect_outcomes reads of each Tune result
    def __init__(self, name, metrics, error=None):
        self.config, self.metrics, self.error = {"trial": name}, metrics, error


def test_stopped_trials_are_interrupted_not_failed(tmp_path):
    space, base, outcomes, configs = sigma_outcomes()
    trials = [o.trial for o in outcomes]
    grid = [Result(trials[0].name, {"emotion/Acc-4": 50.0, "evaluated": 1}),  # finished
            Result(trials[1].name, {}),  # running when the sweep was stopped (no evaluation)
            Result(trials[2].name, {}, error=RuntimeError("boom"))]  # failed; the rest never started
    outcomes = driver.collect_outcomes(grid, trials, interrupted=True)
    assert [o.error for o in outcomes[:3]] == ["", driver.INTERRUPTED, "boom"]
    assert {o.error for o in outcomes[3:]} == {driver.INTERRUPTED}
    # without an interruption the same results read as a scheduler's stop and trials never run
    plain = driver.collect_outcomes(grid, trials)
    assert plain[1].error == "stopped early" and plain[3].error == "not run"

    rows = sweep_report.table_rows(space, base, outcomes)
    markdown = sweep_report.results_markdown(rows, ["emotion/Acc-4", "emotion/F1-4"])
    assert "| interrupted | - |" in markdown and "failed: interrupted" not in markdown
    assert "failed: boom" in markdown


def test_an_incomplete_report_is_marked_and_has_no_best_config(tmp_path):
    space, base, outcomes, configs = sigma_outcomes()
    sweep_dir = str(tmp_path / "sweep")
    storage.write_text(storage.join(sweep_dir, "best_config.yaml"), "left: by an earlier run\n")
    outcomes[1] = sweep_report.TrialOutcome(outcomes[1].trial, error=driver.INTERRUPTED)
    report = sweep_report.write_report(space, base, configs, outcomes, sweep_dir,
                                       incomplete="interrupted, 4 of 6 trials finished")
    md = storage.read_text(storage.join(sweep_dir, "results.md"))
    assert md.startswith("**INCOMPLETE: interrupted, 4 of 6 trials finished.**") and md == report.markdown
    assert report.best is None and report.best_config_yaml == ""
    assert not storage.exists(storage.join(sweep_dir, "best_config.yaml"))
    trials = json.loads(storage.read_text(storage.join(sweep_dir, "trials.json")))
    assert trials["incomplete"] == "interrupted, 4 of 6 trials finished" and trials["best"] is None
    rows = list(csv.DictReader(io.StringIO(storage.read_text(storage.join(sweep_dir, "results.csv")))))
    assert rows and {r["incomplete"] for r in rows} == {"interrupted, 4 of 6 trials finished"}
    # a finished sweep: no mark, a best config
    done = sweep_report.write_report(space, base, configs, sigma_outcomes()[2], sweep_dir)
    assert not done.markdown.startswith("**INCOMPLETE") and done.best is not None
    assert "incomplete" not in json.loads(storage.read_text(storage.join(sweep_dir, "trials.json")))


def test_tune_interrupt_watch_replaces_tunes_lines(restore_signals):
    lines: list[str] = []
    logger = logging.getLogger(driver.TuneInterruptWatch.LOGGER)

    def record(msg: str, level=logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord(logger.name, level, __file__, 1, msg, None, None)

    before = signal.getsignal(signal.SIGINT)
    with driver.TuneInterruptWatch(lines.append) as watch:
        assert watch in logger.filters
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Tune installs its own handler in fit()
        assert watch.filter(record("Trials did not complete: [a]", logging.ERROR))  # not interrupted yet
        assert not watch.interrupted and runtime.stop_signal() == 0
        assert not watch.filter(record("Stop signal received (e.g. via SIGINT/Ctrl+C), ending Ray Tune run."))
        assert not watch.filter(record("Experiment has been interrupted, but the most recent state was saved.\n"
                                       "Resume experiment with: Tuner.restore(path=...)"))
        assert not watch.filter(record("Trials did not complete: [a]", logging.ERROR))
        assert watch.filter(record("something else"))
    assert watch.interrupted and runtime.stop_signal() == signal.SIGINT
    assert len(lines) == 1 and lines[0].startswith("[tune] interrupted") and "resumes" in lines[0]
    assert watch not in logger.filters and signal.getsignal(signal.SIGINT) is before


def test_grid_finished_counts_pending_trials():
    class Grid(list):
        num_terminated, num_errors = 1, 1

    assert driver.grid_finished(Grid([1, 2]))
    assert not driver.grid_finished(Grid([1, 2, 3]))  # one trial still pending
    assert driver.grid_finished([1, 2, 3])  # a plain list (tests' stand-in grids)


def test_sigterm_is_recorded_and_raises_keyboard_interrupt(restore_signals):
    runtime.install_stop_handlers(reset=True)
    assert signal.getsignal(signal.SIGTERM) is runtime._on_stop_signal
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs (and raises) as soon as the signal arrives
    assert runtime.stop_signal() == signal.SIGTERM
    runtime.install_stop_handlers(reset=True)
    assert runtime.stop_signal() == 0


def test_a_stopped_sweep_exits_143_with_what_finished(monkeypatch, capsys, restore_signals):
    def stopped(*args, **kwargs):
        runtime._stop.received = signal.SIGTERM
        raise driver.SweepInterrupted("1 of 2 trials finished; incomplete table: /x/results.md")

    monkeypatch.setattr(driver, "run_tune", stopped)
    monkeypatch.setattr(cli, "exit_within", lambda status, seconds=0: None)  # no timer in pytest's process
    assert cli.main(["tune", "--world", "tiny"]) == 143
    err = capsys.readouterr().err
    assert "pacl-ray tune: stopped by SIGTERM (1 of 2 trials finished; incomplete table: /x/results.md)" in err
    assert "resume with: pacl-ray tune --world tiny" in err
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # a second Ctrl-C can't break the shutdown


# --------------------------------------------------------------------------- whole sweeps


def _tune(tmp_path: Path, out: str, sig: int | None = None) -> tuple[int, str]:
    """Run the tiny sweep; with ``sig``, send it once the first trial has started. Returns
    (exit status, console text)."""
    cmd = [sys.executable, "-m", "pacl_ray.tune", "--world", "tiny", "--world-dir", str(tmp_path / "world"),
           "--output-dir", out, "--set", "train.epochs=60"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    sent = False
    for line in proc.stdout:
        lines.append(line)
        if sig is not None and not sent and line.startswith("[tune] trial ") and " started" in line:
            proc.send_signal(sig)
            sent = True
    status = proc.wait(timeout=600)
    assert sig is None or sent, "".join(lines)[-3000:]
    return status, "".join(lines)


def _assert_interrupted(status: int, text: str, expected: int, out: str) -> None:
    assert status == expected, text[-3000:]
    assert "resume with: pacl-ray tune --world tiny" in text
    assert "Traceback" not in text and "Tuner.restore" not in text and "SIGTERM received" not in text
    assert "== Best config" not in text
    sweep_dir = Path(out) / "sweeps" / "default"
    assert not (sweep_dir / "best_config.yaml").exists()
    if (sweep_dir / "results.md").exists():  # written when Tune ended the run itself (Ctrl-C)
        assert (sweep_dir / "results.md").read_text().startswith("**INCOMPLETE: interrupted")


@pytest.mark.slow  # a tiny sweep interrupted, then resumed: minutes on a loaded 2-core machine
def test_ctrl_c_during_trials_exits_130_and_the_rerun_resumes(tmp_path):
    out = str(tmp_path / "out")
    status, text = _tune(tmp_path, out, signal.SIGINT)
    _assert_interrupted(status, text, 130, out)
    assert "pacl-ray tune: interrupted (0 of 2 trials finished" in text or "pacl-ray tune: interrupted (1 of 2" in text
    assert "[tune] interrupted: saving the sweep's state" in text
    results = (Path(out) / "sweeps" / "default" / "results.md").read_text()  # Tune ended the run: written
    assert results.startswith("**INCOMPLETE: interrupted,") and "| interrupted |" in results
    assert "failed" not in text.split("[tune] interrupted", 1)[1]  # stopped trials are not failures
    status, text = _tune(tmp_path, out)
    assert status == 0, text[-3000:]
    assert "[tune] resuming" in text and "== Best config" in text
    sweep_dir = Path(out) / "sweeps" / "default"
    assert (sweep_dir / "best_config.yaml").exists()
    assert not (sweep_dir / "results.md").read_text().startswith("**INCOMPLETE")


@pytest.mark.slow  # a tiny sweep stopped by SIGTERM, then rerun to completion
def test_sigterm_during_trials_exits_143_and_the_rerun_resumes(tmp_path):
    out = str(tmp_path / "out")
    status, text = _tune(tmp_path, out, signal.SIGTERM)
    _assert_interrupted(status, text, 143, out)
    assert "pacl-ray tune: stopped by SIGTERM" in text
    status, text = _tune(tmp_path, out)
    assert status == 0, text[-3000:]
    sweep_dir = Path(out) / "sweeps" / "default"
    assert (sweep_dir / "best_config.yaml").exists() and "== Best config" in text
    assert not (sweep_dir / "results.md").read_text().startswith("**INCOMPLETE")
