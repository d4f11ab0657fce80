"""What a user reads on the console: the checks the tiny sweep's captured console must pass
(tests/sweeps/test_driver.py::test_tiny_sweep_end_to_end applies them to its own run, so the
suite runs the sweep once), the checks themselves on known-bad text, the progress helper and the
summary de-duplication."""

from __future__ import annotations

import io
import re

MAX_LINE = 200
# A Python dict repr: "{'key': " (json.dumps output uses double quotes and is not printed).
DICT_REPR = re.compile(r"\{'[^']*': ")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Ray's C++ runtime logs these itself: the raylet's warnings about a loaded machine ("N PYTHON
# worker processes have been started ...") and core_worker.cc lines such as Ray Train's own
# PreemptionWatcher actor notice (ray-project/ray#53727). Only RAY_BACKEND_LOG_LEVEL silences
# them, and that would hide real errors too.
RAY_RUNTIME = re.compile(r"\(raylet\)|\] \w+\.cc:\d+: ")


def console_problems(text: str, summaries: tuple[str, ...] = ()) -> list[str]:
    """Every problem of a captured console: tracebacks, Python dict reprs, lines over MAX_LINE
    characters, ANSI colour codes, and each of ``summaries`` (a line prefix) printed other than
    exactly once."""
    problems = []
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if RAY_RUNTIME.search(line):
            continue
        if "Traceback (most recent call last)" in line:
            problems.append(f"line {number}: traceback: " + " | ".join(lines[number - 2: number + 14])[:2000])
        if DICT_REPR.search(line):
            problems.append(f"line {number}: dict repr: {line[:120]}")
        if len(line) > MAX_LINE:
            problems.append(f"line {number}: {len(line)} characters: {line[:120]}")
        if ANSI.search(line):
            problems.append(f"line {number}: ANSI colour codes")
    for summary in summaries:
        count = sum(line.startswith(summary) for line in text.splitlines())
        if count != 1:
            problems.append(f"summary {summary!r} printed {count} times")
    return problems


def test_console_problems_finds_each_kind():
    bad = "\n".join([
        "Traceback (most recent call last):",
        "[evaluate] emotion: {'name': 'emotion', 'kind': 'single'}",
        "x" * 201,
        "\x1b[36m(pacl_trial pid=1)\x1b[0m train: 3 steps",
        "partition: 200 pairs", "partition: 200 pairs",
        "(raylet) WARNING: " + "y" * 300,
    ])
    problems = console_problems(bad, summaries=("partition:", "cluster:"))
    assert [p.split(":")[0] for p in problems] == ["line 1", "line 2", "line 3", "line 4",
                                                   "summary 'partition", "summary 'cluster"]
    assert console_problems('ok {"json": 1}\n' + "z" * 200, summaries=("ok",)) == []


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


def test_quiet_env_in_logs(monkeypatch):
    from pacl_ray.stages import runtime

    monkeypatch.setattr(runtime, "interactive", lambda: False)
    env = runtime.quiet_env()
    assert env["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1" and env["RAY_COLOR_PREFIX"] == "0"
    monkeypatch.setattr(runtime, "interactive", lambda: True)
    assert "RAY_DATA_DISABLE_PROGRESS_BARS" not in runtime.quiet_env()
