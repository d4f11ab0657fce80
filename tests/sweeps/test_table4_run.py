"""`python -m pacl_ray.tune --space tune_spaces/table4.yaml` end to end on the tiny embedded world:
the paper's eight Table-4 rows train and are evaluated (tiny sizes)."""

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
