"""The cluster path on URIs: a tiny sweep whose output_dir is a ``file://`` URI or an S3 bucket
(moto on 127.0.0.1) trains, exports, evaluates the export and writes the results table there,
and a relaunch resumes it (the finished trial is kept, nothing is retrained).

One trial of one epoch on the tiny embedded world, so both stay cheap enough for the default
suite. Ray workers reach the moto server through ``runtime_env`` environment variables, so the
S3 case runs on a Ray instance of its own."""

from __future__ import annotations

import csv
import io
import json
from typing import Iterator

import pytest
import yaml

from moto_s3 import moto_s3
from pacl_ray.formats import storage
from pacl_ray import cli

# ray_local's settings, restored after the S3 case has run on a Ray instance of its own
LOCAL_RAY = dict(num_cpus=8, num_gpus=0, include_dashboard=False, configure_logging=False)


def _restart_ray(env: dict[str, str] | None) -> None:
    """(Re)start the local Ray instance; ``env`` goes to every worker (None: ray_local's instance)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    runtime_env = {"worker_process_setup_hook": "pacl_ray.stages.runtime.quiet_worker_logs"}
    if env:
        runtime_env["env_vars"] = dict(env)
    ray.init(runtime_env=runtime_env, **LOCAL_RAY)


@pytest.fixture(params=["file", "s3"])
def output_uri(request, tmp_path, monkeypatch) -> Iterator[str]:
    """The sweep's output_dir as a URI: ``file://<tmp>/runs``, or ``s3://pacl/runs`` on moto."""
    if request.param == "file":  # any Ray instance will do; the tune command starts one if needed
        yield f"file://{tmp_path}/runs"
        return
    with moto_s3() as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        _restart_ray(env)
        try:
            yield "s3://pacl/runs"
        finally:
            _restart_ray(None)


def _completed(output: str, stage: str) -> int:
    return len(storage.list_files(storage.join(output, "stages", stage), "_SUCCESS"))


@pytest.mark.timeout(900)  # the tiny world (built once, cached) + every stage + a relaunch
def test_tiny_sweep_on_a_uri_trains_evaluates_and_resumes(output_uri, tmp_path, capsys):
    space = tmp_path / "remote.yaml"
    space.write_text(yaml.safe_dump({
        "fixed": {"train": {"epochs": 1, "global_batch_size": 16},
                  "evaluate": {"linear_epochs": 2, "batch_size": 32}},
        "search": {"partition.sigma": {"grid": [0.5]}},  # the world's adopted sigma: one trial
        "metric": {"name": "emotion/Acc", "mode": "max"},
        "resources": {"max_concurrent": 1, "trial_cpus": 0.5},
    }))
    argv = ["--space", str(space), "--world", "tiny", "--output-dir", output_uri, "--name", "remote"]
    assert cli.main(["tune", *argv]) == 0
    printed = capsys.readouterr().out
    assert "0.5 (adopted)" in printed and "initial backbone" in printed
    sweep = storage.join(output_uri, "sweeps", "remote")
    rows = list(csv.DictReader(io.StringIO(storage.read_text(storage.join(sweep, "results.csv")))))
    assert [r["value"] for r in rows] == ["0.5 (adopted)", "before training"]
    accuracy = next(c for c in rows[0] if c.startswith("emotion/Acc-"))
    assert all(0 <= float(r[accuracy]) <= 100 for r in rows)  # the trial was evaluated: no error
    assert f"| {accuracy} |" in storage.read_text(storage.join(sweep, "results.md"))
    trials = json.loads(storage.read_text(storage.join(sweep, "trials.json")))["trials"]
    assert [t["error"] for t in trials] == [""]
    exported = trials[0]["backbone_checkpoint"]
    assert exported.startswith(output_uri.split("://")[0] + "://") and storage.exists(exported)
    # the trial's own evaluation table (Table 1 layout) lies beside the sweep's, on the URI
    trial_table = storage.read_text(storage.join(sweep, "trials", "adopted", "results.md"))
    assert "| adopted | Linear Evaluation |" in trial_table
    assert _completed(output_uri, "train") == 1

    assert cli.main(["tune", *argv]) == 0  # relaunch: the finished trial is restored, not retrained
    assert "resuming" in capsys.readouterr().out
    assert _completed(output_uri, "train") == 1
    again = json.loads(storage.read_text(storage.join(sweep, "trials.json")))["trials"]
    assert again[0]["metrics"] == trials[0]["metrics"] and again[0]["error"] == ""
