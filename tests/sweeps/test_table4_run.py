"""`python -m pacl_ray.tune --space tune_spaces/table4.yaml` end to end on the tiny embedded world:
the paper's eight Table-4 rows train and are evaluated (tiny sizes), in the default suite at the
smallest sizes and, marked slow, with every progressive phase."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from pacl_ray import cli
from pacl_ray.sweeps.spaces import load_space

REPO = Path(__file__).resolve().parents[2]
# paper Table 4's rows, in its order (their configurations are checked in test_spaces.py)
NAMES = [
    "None: All", "Factual: Factual-matched", "Factual: Factual-matched + Factual-mismatched",
    "Emotional: Emotional-matched", "Emotional: Emotional-matched + Emotional-mismatched", "Both: Strong-coupled",
    "Both: Strong-coupled + Partial-coupled", "Both: Strong-coupled + Partial-coupled + Weak-coupled",
]


# paper Table 4's labels of those rows (Partition, Sample Usage), as results.md prints them
LABELS = [
    ("None", "All"), ("Factual", "Factual-matched"), ("Factual", "Factual-matched + Factual-mismatched"),
    ("Emotional", "Emotional-matched"), ("Emotional", "Emotional-matched + Emotional-mismatched"),
    ("Both", "Strong-coupled"), ("Both", "Strong-coupled + Partial-coupled"),
    ("Both", "Strong-coupled + Partial-coupled + Weak-coupled"),
]


@pytest.mark.timeout(1200)  # 8 one-epoch trials, 2 at a time; long only on a crowded machine
def test_table4_space_runs_in_the_default_suite(ray_local, tmp_path, capsys):
    """The Done-when of issue 19: the space file itself, every row through Tune, Ray Train and the
    downstream probe, at the smallest sizes: one epoch (the first progressive phase; the slow test
    below runs all three) at a global batch of 32, which the 57 strong-coupled pairs of the tiny
    world still fill, and a one-epoch probe."""
    output = tmp_path / "runs"
    argv = ["tune", "--space", str(REPO / "tune_spaces" / "table4.yaml"), "--world", "tiny",
            "--output-dir", str(output), "--name", "table4", "--max-concurrent", "2",
            "--set", "train.epochs=1", "--set", "train.global_batch_size=32", "--set", "partition.sigma=0.5",
            "--set", "evaluate.linear_epochs=1", "--set", "evaluate.batch_size=64"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    sweep = output / "sweeps" / "table4"
    trials = json.loads((sweep / "trials.json").read_text())["trials"]
    assert [t["name"] for t in trials] == NAMES
    assert all(not t["error"] and t["metrics"] for t in trials), [t["error"] for t in trials]
    # results.md in the paper's Table 4 layout: the initial weights, then each row under its labels
    table = (sweep / "results.md").read_text()
    lines = table.splitlines()
    assert lines[0].startswith("| Partition | Sample Usage | emotion Acc-")
    assert lines[2].startswith("| Initial weight |  | ")
    assert [tuple(line.split(" | ")[:2]) for line in lines[3:]] == [(f"| {p}", u) for p, u in LABELS]
    assert "| config |" not in table and table in printed
    # shared stages run once: one scoring and clustering, one thresholding per partition.use_scores
    stages = output / "stages"
    count = lambda stage: len([p for p in (stages / stage).iterdir() if (p / "_SUCCESS").exists()])  # noqa: E731
    assert count("scores") == 1 and count("cluster") == 1 and count("partition") == 3
    assert count("train") == 8


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_table4_space_runs_every_row(ray_local, tmp_path, capsys):
    output = tmp_path / "runs"
    argv = ["tune", "--space", str(REPO / "tune_spaces" / "table4.yaml"), "--world", "tiny",
            "--output-dir", str(output), "--name", "table4",
            # tiny sizes: three epochs so every progressive phase occurs; sigma on the world's scale
            "--set", "train.epochs=3", "--set", "train.global_batch_size=16", "--set", "partition.sigma=0.5",
            "--set", "evaluate.linear_epochs=2", "--set", "evaluate.batch_size=32"]
    assert cli.main(argv) == 0
    sweep = output / "sweeps" / "table4"
    names = NAMES
    assert [row.name for row in load_space(str(REPO / "tune_spaces" / "table4.yaml")).rows] == names
    trials = json.loads((sweep / "trials.json").read_text())["trials"]
    assert [t["name"] for t in trials] == names
    assert all(not t["error"] and t["metrics"] for t in trials), [t["error"] for t in trials]
    rows = list(csv.DictReader(io.StringIO((sweep / "results.csv").read_text())))
    assert [r["value"] for r in rows[:8]] == names
    # one scoring pass; one thresholding per partition.use_scores
    stages = output / "stages"
    count = lambda stage: len([p for p in (stages / stage).iterdir() if (p / "_SUCCESS").exists()])  # noqa: E731
    assert count("scores") == 1 and count("partition") == 3
