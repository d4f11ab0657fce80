"""What a user reads on the console: the checks the tiny sweep's captured console must pass
(tests/sweeps/test_driver.py::test_tiny_sweep_end_to_end applies them to its own run, so the
suite runs the sweep once), the checks themselves on known-bad text, the progress helper and the
summary de-duplication."""

from __future__ import annotations

import io
import re

import pytest

MAX_LINE = 200
# Prose (a line with its paths and URIs taken out) longer than this: what a user reads in one go.
MAX_PROSE = 120
PATH = re.compile(r"\S*/\S*")
# A dataclass repr such as "StageOutput(stage='ingest', key=..." (a summary should be printed instead).
DATACLASS_REPR = re.compile(r"\b[A-Z]\w+\(\w+=")
# A Python dict repr: "{'key': " (json.dumps output uses double quotes and is not printed).
DICT_REPR = re.compile(r"\{'[^']*': ")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Ray's own noise, each silenced by a public switch (pacl_ray.stages.runtime): the log-dedup suffix,
# the raylet's worker-pool warning, core_worker's PreemptionWatcher notice and Train's cleaner
# warning (dropped by RAY_DEDUP_LOGS_SKIP_REGEX), Tune's experiment box (box-drawing characters) and TensorBoard hint
# into Ray's session folder (RAY_AIR_NEW_OUTPUT=0).
NOISE = {
    "Ray log-dedup suffix": re.compile(r"\[repeated \d+x across cluster\]"),
    "raylet worker-pool warning": re.compile(r"PYTHON worker processes have been started"),
    "PreemptionWatcher notice": re.compile(r"'PreemptionWatcher'.*constructor arguments"),
    "Train placement-group cleaner warning": re.compile(r"Failed to query Ray Train Controller actor state"),
    "box drawing (Tune's experiment box)": re.compile("[\u2500-\u257f]"),
    "path into Ray's session folder": re.compile(r"/ray/session_"),
}


def console_problems(text: str, summaries: tuple[str, ...] = ()) -> list[str]:
    """Every problem of a captured console: tracebacks, Python dict or dataclass reprs, lines over
    MAX_LINE characters or over MAX_PROSE without their paths, " [cached]" glued to an indented
    line (it belongs on a summary's header line), ANSI colour codes, Ray's noise (NOISE), a
    worker's line twice in a row, and each of ``summaries`` (a line prefix) printed other than
    exactly once."""
    problems = []
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if "Traceback (most recent call last)" in line:
            problems.append(f"line {number}: traceback: " + " | ".join(lines[number - 2: number + 14])[:2000])
        if DICT_REPR.search(line):
            problems.append(f"line {number}: dict repr: {line[:120]}")
        if DATACLASS_REPR.search(line):
            problems.append(f"line {number}: dataclass repr: {line[:120]}")
        if len(line) > MAX_LINE:
            problems.append(f"line {number}: {len(line)} characters: {line[:120]}")
        if line[:1].isspace() and line.endswith(" [cached]"):
            problems.append(f"line {number}: [cached] after a block's last line: {line[:120]}")
        if ANSI.search(line):
            problems.append(f"line {number}: ANSI colour codes: {line[:120]!r}")
        for kind, pattern in NOISE.items():
            if pattern.search(line):
                problems.append(f"line {number}: {kind}: {line[:120]}")
        prose = len(PATH.sub("", line))
        if prose > MAX_PROSE and not any(p.startswith(f"line {number}: ") for p in problems):
            problems.append(f"line {number}: {prose} characters besides paths: {line[:120]}")
        if line.startswith("(") and number > 1 and line == lines[number - 2]:
            # a worker's line twice (Ray Train's print patch also prints what it logs)
            problems.append(f"line {number}: worker line repeated: {line[:120]}")
    for summary in summaries:
        count = sum(line.startswith(summary) for line in text.splitlines())
        if count != 1:
            problems.append(f"summary {summary!r} printed {count} times")
    return problems


# Lines as Ray 2.60 prints them (shortened ids).
RAYLET_WARNING = ("(raylet) WARNING: 10 PYTHON worker processes have been started on node: d072e3 with "
                  "address: 192.0.2.2, which is 5x the maximum expected startup concurrency (2). This could be "
                  "a result of using a large number of actors, or due to tasks blocked in ray.get() calls")
PREEMPTION_NOTICE = ("(TrainController pid=31831) [2026-12-01 04:39:55,809 E 31831 31857] core_worker.cc:2465: "
                     "Actor with class name: 'PreemptionWatcher' and ID: '49742a' has constructor arguments in "
                     "the object store and max_restarts > 0.")


def test_console_problems_finds_each_kind():
    bad = "\n".join([
        "Traceback (most recent call last):",
        "[evaluate] emotion: {'name': 'emotion', 'kind': 'single'}",
        "x" * 201,
        "\x1b[36m(pacl_trial pid=1)\x1b[0m train: 3 steps",
        "(pacl_trial pid=2) train: 3 steps \x1b[32m [repeated 7x across cluster]\x1b[0m",
        RAYLET_WARNING[:150],
        PREEMPTION_NOTICE[:180],
        "\u256d\u2500\u2500 Configuration for experiment \u2500\u2500\u256e",
        "To visualize your results with TensorBoard, run: `tensorboard --logdir /tmp/ray/session_2026/artifacts`",
        "partition: 200 pairs", "partition: 200 pairs",
        "(RayTrainWorker pid=3) train: step 3 epoch 1", "(RayTrainWorker pid=3) train: step 3 epoch 1",
        "ingest: StageOutput(stage='ingest', key='9c78', uri='/tmp/x', cached=True)",
        "(pacl_trial pid=1) train: epoch 0: phase 1 holds 57 pairs, fewer than one global batch of 64: no step "
        "(partition counts 1 strong-coupled: 57)",
        "         20       4       8      22 [cached]",
    ])
    problems = console_problems(bad, summaries=("partition:", "cluster:"))
    assert [p.split(": ")[0] for p in problems] == [
        "line 1", "line 2", "line 3", "line 4", "line 5", "line 5", "line 6", "line 7", "line 8", "line 9",
        "line 13", "line 14", "line 15", "line 16", "summary 'partition:' printed 2 times",
        "summary 'cluster:' printed 0 times"]
    assert [p.split(": ")[1] for p in problems[4:10]] == [
        "ANSI colour codes", "Ray log-dedup suffix", "raylet worker-pool warning", "PreemptionWatcher notice",
        "box drawing (Tune's experiment box)", "path into Ray's session folder"]
    assert [p.split(": ")[1] for p in problems[11:14]] == [
        "dataclass repr", "141 characters besides paths", "[cached] after a block's last line"]
    assert console_problems('ok {"json": 1}\n' + "z" * 120 + "\n" + "/" + "p" * 198, summaries=("ok",)) == []
    assert console_problems("partition: 200 pairs [cached]\n  1 strong-coupled  69") == []


def test_console_env_skips_rays_notices_and_allows_every_other_line(monkeypatch):
    """The deduplication switches (runtime.console_env) as Ray applies them: a line matching the
    allow regex is printed as it comes, else one matching the skip regex is dropped."""
    from pacl_ray.stages import runtime

    monkeypatch.setattr(runtime, "interactive", lambda: False)
    env = runtime.console_env()
    assert env["RAY_COLOR_PREFIX"] == "0" and env["RAY_AIR_NEW_OUTPUT"] == "0"
    allow, skip = re.compile(env["RAY_DEDUP_LOGS_ALLOW_REGEX"]), re.compile(env["RAY_DEDUP_LOGS_SKIP_REGEX"])
    cleaner = ("(PlacementGroupCleaner pid=7) Failed to query Ray Train Controller actor state. "
               "State API may be temporarily unavailable. Continuing to monitor.")
    report = ("(RayTrainWorker pid=9) Reporting training result 3: TrainingReport(checkpoint=Checkpoint("
              "filesystem=local, path=/tmp/x), metrics={'global_step': 6})")
    for line in (RAYLET_WARNING, PREEMPTION_NOTICE, cleaner, report):
        assert not allow.search(line) and skip.search(line) and runtime.skipped_line(line)
    for line in ("(pacl_trial pid=2) train: 3 steps", "cluster: 200 points", "(raylet) Out of memory: killed"):
        assert allow.search(line) and not runtime.skipped_line(line)
    monkeypatch.setattr(runtime, "interactive", lambda: True)  # a terminal: Ray's dedup, minus the notices
    assert set(runtime.console_env()) == {"RAY_DEDUP_LOGS_SKIP_REGEX", "RAY_AIR_NEW_OUTPUT", "TUNE_WARN_THRESHOLD_S"}


def test_once_filter_passes_each_summary_once():
    from pacl_ray.sweeps.driver import OnceFilter

    out = io.StringIO()
    once = OnceFilter(out)
    once.write("cluster: 200 points\n  K=2 factual\n  K=2 emotional\n")
    once.write("[tune] upstream for adopted\n")
    assert out.getvalue().endswith("[tune] upstream for adopted\n")  # log lines are not held
    once.write("cluster: 200 points\n  K=2 factual\n  K=2 emotional [cached]\n")
    once.write("partition: 200 pairs; sigma 0.3\n  1 strong 104\n")
    once.write("partition: 200 pairs; sigma 0.5\n  1 strong 57\n")
    once.close_block()
    text = out.getvalue()
    assert text.count("cluster: 200 points") == 1 and "[cached]" not in text
    assert "sigma 0.3\n  1 strong 104" in text and "sigma 0.5\n  1 strong 57" in text


def test_once_filter_drops_a_cached_summary_marked_on_its_header(tmp_path, capsys):
    """A reused stage's summary says " [cached]" on its first line (stages.cache.run_cached), never
    after the last row of its table; the filter drops it as the same summary."""
    from pathlib import Path

    from pacl_ray.stages import cache
    from pacl_ray.sweeps.driver import OnceFilter

    table = "partition: 200 pairs\n  1 strong-coupled  69\n  confusion:\n         20       4"
    out = io.StringIO()
    once = OnceFilter(out)
    once.write(table + "\n")
    once.write(table.replace("pairs\n", "pairs [cached]\n", 1) + "\n")
    once.close_block()
    assert out.getvalue() == table + "\n"

    def build(staging: str) -> dict:
        (Path(staging) / "report.json").parent.mkdir(parents=True, exist_ok=True)
        (Path(staging) / "report.json").write_text("{}")
        return {"pairs": 200}

    def describe(summary: dict) -> str:
        return f"partition: {summary['pairs']} pairs\n  confusion:\n         20       4"

    cache.run_cached(str(tmp_path), "partition", "k1", build, describe=describe)
    assert capsys.readouterr().out == "partition: 200 pairs\n  confusion:\n         20       4\n"
    assert cache.run_cached(str(tmp_path), "partition", "k1", build, describe=describe).cached
    assert capsys.readouterr().out == "partition: 200 pairs [cached]\n  confusion:\n         20       4\n"


def test_the_training_plan_is_two_short_lines_once_per_run():
    """Not one 200-character line per epoch that takes no step: the steps and partition counts,
    then the epochs with no step grouped by phase (run.log keeps the long form)."""
    from pacl_ray.stages.train import plan_summary, startup_summary
    from pacl_ray.stages.train_data import TrainingPlan

    phases = [(1,)] * 4 + [(1, 2, 3)] * 3 + [(1, 2, 3, 4)] * 3
    plan = TrainingPlan(phases, [0, 0, 0, 0, 1, 1, 1, 2, 2, 2], [57] * 4 + [120] * 3 + [200] * 3,
                        {1: 57, 2: 31, 3: 32, 4: 80}, 64)
    assert plan_summary(plan) == [
        "train: 9 global steps of 64 over 10 epochs; partitions 1-4: 57 / 31 / 32 / 80 pairs",
        "train: no step in epochs 0-3 (phase 1: 57 pairs): under one global batch of 64"]
    plan = TrainingPlan([(1,), (1,), (4,), (), (1,), (1,)], [0, 0, 0, 0, 1, 0], [10, 10, 5, 0, 70, 10],
                        {1: 10, 2: 31, 3: 32, 4: 5}, 64)
    assert plan_summary(plan)[1] == ("train: no step in these epochs, under one global batch of 64:\n"
                                     "  epochs 0-1, 5 (phase 1: 10 pairs)\n  epoch 2 (phase 4: 5 pairs)\n"
                                     "  epoch 3 (phase empty: 0 pairs)")
    assert plan_summary(TrainingPlan([(1,)], [3], [200], {1: 200}, 64)) == [
        "train: 3 global steps of 64 over 1 epochs; partitions 1-4: 200 / 0 / 0 / 0 pairs"]
    times = {"start_to_first_step_s": 10.71, "driver_setup_s": 3.7, "worker_start_s": 0.0, "worker_to_first_step_s": 7.04}
    assert startup_summary(times) == "train: first step at 10.7 s (setup 3.7 s, worker start 0.0 s, then 7.0 s)"
    for line in "\n".join(plan_summary(plan) + [startup_summary(times)]).splitlines():
        assert len("(pacl_trial pid=12345) " + line) <= MAX_PROSE, line


def test_progress_lines_have_counts_rate_and_eta(monkeypatch):
    from pacl_ray.stages import runtime

    monkeypatch.setattr(runtime, "interactive", lambda: False)
    now = [0.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: now[0])
    stream = io.StringIO()
    with runtime.Progress("[world] scorer", 40, "steps", interval=10.0, stream=stream) as progress:
        now[0] = 5.0
        progress.update(5)  # under the interval: no line
        now[0] = 12.0
        progress.update(5)
        now[0] = 30.0
        progress.update(30)
        now[0] = 32.0
    assert stream.getvalue().splitlines() == [
        "[world] scorer: 10/40 steps [12 s, 0.83 steps/s, ETA 36 s]",
        "[world] scorer: 40/40 steps [30 s, 1.33 steps/s]",  # close() adds nothing: shown
    ]
    with runtime.Progress("[world] fit", 3, "steps", interval=10.0, stream=stream) as progress:
        progress.update(3)  # under the interval: close() prints the final count
    assert stream.getvalue().splitlines()[-1].startswith("[world] fit: 3/3 steps [0 s")
    quiet = io.StringIO()
    with runtime.Progress("[inference] ClipScorer", 64, "rows", interval=10.0, stream=quiet, final=False) as progress:
        progress.update(64)  # a step shorter than the interval prints nothing with final=False
    assert quiet.getvalue() == ""
    with runtime.Progress("[inference] ClipScorer", 64, "rows", interval=10.0, stream=quiet, final=False) as progress:
        now[0] = 50.0
        progress.update(32)
        progress.update(32)  # ... a longer one its last count too
    assert quiet.getvalue().splitlines() == ["[inference] ClipScorer: 32/64 rows [18 s, 1.78 rows/s, ETA 18 s]",
                                             "[inference] ClipScorer: 64/64 rows [18 s, 3.56 rows/s]"]


def test_watch_counts_work_that_runs_elsewhere(monkeypatch):
    """runtime.Watch: each poll sets the progress to the count (e.g. rows of the Parquet files a
    Ray Data write has finished) and prints once the interval has passed, even with the count
    unchanged; a failing count is skipped; on exit a last poll and the close."""
    from pacl_ray.stages import runtime

    monkeypatch.setattr(runtime, "interactive", lambda: False)
    now = [0.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: now[0])
    counts = iter([RuntimeError("file still being written"), 40, 40, 100])

    def count():
        value = next(counts)
        if isinstance(value, Exception):
            raise value
        return value

    stream = io.StringIO()
    progress = runtime.Progress("[inference] ImageFeatureExtractor", 100, "rows", stream=stream, final=False)
    with runtime.Watch(progress, count, interval=3600) as watch:  # the thread never polls here
        now[0] = 5.0
        watch.poll()  # the count fails: nothing changes
        assert progress.done == 0
        now[0] = 12.0
        watch.poll()
        assert progress.done == 40
        now[0] = 23.0
        watch.poll()  # the count stands still (one long batch): a line all the same
        now[0] = 25.0
    assert stream.getvalue().splitlines() == [
        "[inference] ImageFeatureExtractor: 40/100 rows [12 s, 3.33 rows/s, ETA 18 s]",
        "[inference] ImageFeatureExtractor: 40/100 rows [23 s, 1.74 rows/s, ETA 34 s]",
        "[inference] ImageFeatureExtractor: 100/100 rows [25 s, 4.00 rows/s]"]


def test_phase_lines_say_what_still_runs(monkeypatch):
    """A step with uncounted sub-steps (runtime.Progress.phase): "still running: <phase>, N s" with
    the count so far; an unknown total shows no ETA; close() adds no line while a phase is set."""
    from pacl_ray.stages import runtime

    monkeypatch.setattr(runtime, "interactive", lambda: False)
    now = [0.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: now[0])
    stream = io.StringIO()
    with runtime.Watch(runtime.Progress("[ingest]", 0, "records validated", interval=10.0, stream=stream,
                                        final=False, phase="validating records")) as watch:
        now[0] = 11.0
        watch.poll()  # no count: the heartbeat alone
        watch.progress.update(200)
        watch.progress.phase = "writing 200 pairs"
        now[0] = 25.0
        watch.poll()
    assert stream.getvalue().splitlines() == [
        "[ingest] still running: validating records, 11 s",
        "[ingest] still running: writing 200 pairs, 25 s; 200 records validated"]
    unknown = runtime.Progress("[cluster] k-means", 0, "iterations", interval=10.0, stream=stream)
    unknown.done = 7
    now[0] = 50.0
    assert unknown.line() == "[cluster] k-means: 7 iterations [25 s, 0.28 iterations/s]"


def test_watched_steps_shorter_than_the_interval_print_nothing(monkeypatch):
    from pacl_ray.stages import runtime

    monkeypatch.setattr(runtime, "interactive", lambda: False)
    now = [0.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: now[0])
    stream = io.StringIO()
    with runtime.watched("[ray]", phase="starting a local Ray instance", interval=10.0, stream=stream) as watch:
        now[0] = 9.0
        watch.poll()
    with runtime.watched("[evaluate] linear probe", 40, "epochs", interval=10.0, stream=stream) as watch:
        watch.progress.update(40)
    assert stream.getvalue() == ""
    with runtime.watched("[evaluate] linear probe", 40, "epochs", interval=10.0, stream=stream) as watch:
        watch.progress.update(20)
        now[0] = 20.0
        watch.poll()  # due: a line ...
        watch.progress.update(20)
    assert stream.getvalue().splitlines() == [  # ... and, shown before, the last count at the end
        "[evaluate] linear probe: 20/40 epochs [11 s, 1.82 epochs/s, ETA 11 s]",
        "[evaluate] linear probe: 40/40 epochs [11 s, 3.64 epochs/s]"]


def test_watched_heartbeat_fires_from_its_thread(monkeypatch):
    """The daemon thread itself prints while the block is busy (a fake slow step that returns only
    once it has seen the line); the interval is the module default, set tiny."""
    from console_capture import heartbeat
    from pacl_ray.stages import runtime

    lines = heartbeat(monkeypatch)
    with runtime.watched("[ray]", phase="starting a local Ray instance"):
        lines.wait_for("[ray] still running: starting a local Ray instance, ")


def test_quiet_env_in_logs(monkeypatch):
    from pacl_ray.stages import runtime

    monkeypatch.setattr(runtime, "interactive", lambda: False)
    env = runtime.quiet_env()
    assert env["RAY_COLOR_PREFIX"] == "0" and env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    monkeypatch.setattr(runtime, "interactive", lambda: True)
    assert "RAY_COLOR_PREFIX" not in runtime.quiet_env()


def test_a_ray_start_failure_is_one_line_with_advice(monkeypatch, capsys):
    """Ray's node timing out at start (a loaded machine): RayStartError naming what Ray said and
    what to try; the CLI prints one line, no traceback, exit 1."""
    import ray

    from pacl_ray import cli
    from pacl_ray.stages import runtime

    def timed_out(*args, **kwargs):
        raise Exception("The current node timed out during startup. This could happen because\\n"
                        "some of the raylet failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", timed_out)
    with pytest.raises(runtime.RayStartError, match=r"could not start a local Ray instance: The current node "
                       r"timed out during startup\. .*nothing already done is lost.*retry the same command"):
        runtime.init_ray()

    monkeypatch.setitem(cli.COMMAND_HANDLERS, "world", lambda args: runtime.init_ray())
    assert cli.main(["world"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pacl-ray world: RayStartError: could not start a local Ray")
    assert "Traceback" not in err[0]


def test_worker_processes_drop_an_unraisable_systemexit_only(monkeypatch, capsys):
    """Ray's SIGTERM handler raising SystemExit inside a weakref callback of an exiting trial actor
    printed "Exception ignored in ... SystemExit: 1" with a traceback; other unraisables still print."""
    import gc
    import sys

    from pacl_ray.stages.runtime import quiet_exit_unraisable

    class Raises:
        def __init__(self, exc):
            self.exc = exc

        def __del__(self):  # an exception here is "unraisable": it goes to sys.unraisablehook
            raise self.exc

    monkeypatch.setattr(sys, "unraisablehook", quiet_exit_unraisable)
    Raises(SystemExit(1))
    gc.collect()
    assert capsys.readouterr().err == ""
    Raises(ValueError("a real one"))
    gc.collect()
    assert "ValueError: a real one" in capsys.readouterr().err
