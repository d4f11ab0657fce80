"""Sweep tracking: the trial progress callback's lines, and MLflow and W&B through Ray Tune's own
logger callbacks, offline (MLflow's local file store, W&B's offline mode; each skipped where its
package is not installed)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from pacl_ray.sweeps import driver
from pacl_ray.sweeps.spaces import parse_space
from pacl_ray.sweeps.tracking import TrialProgress, tracking_callbacks


def test_trial_progress_lines(monkeypatch):
    lines: list[str] = []
    now = [0.0]
    monkeypatch.setattr("pacl_ray.sweeps.tracking.time.monotonic", lambda: now[0])
    progress = TrialProgress(2, lines.append, heartbeat_s=30)
    trial = lambda name, status: types.SimpleNamespace(config={"trial": name}, status=status)  # noqa: E731
    trials = [trial("adopted", "RUNNING"), trial("partition.sigma=0.3", "PENDING")]
    progress.on_trial_start(0, trials, trials[0])
    now[0] = 20.0
    progress.on_step_end(1, trials)  # under the heartbeat: nothing
    now[0] = 40.0
    trials[0].status = "TERMINATED"
    progress.on_step_end(2, trials)
    progress.on_trial_complete(3, trials, trials[0])
    assert lines == [
        "[tune] trial adopted started; 0/2 trials done, 1 running [0 s]",
        "[tune] 1/2 trials done, 0 running [40 s, ETA 40 s]",
        "[tune] trial adopted finished; 1/2 trials done, 0 running [40 s, ETA 40 s]",
    ]


def test_a_restored_sweeps_progress_counts_from_its_own_launch(monkeypatch):
    """Tune unpickles a restored sweep's callbacks with the first launch's clock; setup() (called
    at every launch) restarts the stamps, and the ETA covers only what this launch finished."""
    import pickle

    lines: list[str] = []
    now = [1000.0]
    monkeypatch.setattr("pacl_ray.sweeps.tracking.time.monotonic", lambda: now[0])
    first = TrialProgress(3, heartbeat_s=30)
    now[0] = 5.0  # another process: another monotonic origin
    progress = pickle.loads(pickle.dumps(first))
    progress._log = lines.append
    progress.setup(stop=None)
    trial = lambda name, status: types.SimpleNamespace(config={"trial": name}, status=status)  # noqa: E731
    trials = [trial("a", "TERMINATED"), trial("b", "RUNNING"), trial("c", "PENDING")]
    progress.on_trial_start(0, trials, trials[1])
    now[0] = 25.0
    progress.on_trial_complete(1, trials, trials[1])
    assert lines == [
        "[tune] trial b started; 1/3 trials done, 1 running [0 s]",
        "[tune] trial b finished; 2/3 trials done, 0 running [20 s, ETA 20 s]",
    ]


def test_trial_progress_counts_the_ending_trial_as_done():
    """Tune calls on_trial_complete / on_trial_error while the trial's status is still RUNNING."""
    lines: list[str] = []
    progress = TrialProgress(2, lines.append, heartbeat_s=30)
    trial = lambda name: types.SimpleNamespace(config={"trial": name}, status="RUNNING")  # noqa: E731
    trials = [trial("adopted"), trial("baseline:vanilla")]
    progress.on_trial_complete(0, trials, trials[0])
    trials[0].status = "TERMINATED"
    progress.on_trial_error(1, trials, trials[1])
    assert [line.split(" [")[0] for line in lines] == [
        "[tune] trial adopted finished; 1/2 trials done, 1 running",
        "[tune] trial baseline:vanilla failed (see the sweep report); 2/2 trials done, 0 running",
    ]


def test_no_tracker_by_default_and_a_missing_one_is_named(monkeypatch):
    assert tracking_callbacks({}, "sweep") == []
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    # (and Ray's integration module not imported now: it would keep `wandb = None` for later tests)
    monkeypatch.setitem(sys.modules, "ray.air.integrations.wandb", None)
    with pytest.raises(ImportError, match="tracking.wandb_project is set but wandb is not installed"):
        tracking_callbacks({"wandb_project": "p"}, "sweep")


def test_mlflow_runs_are_named_and_hold_hyperparameters_and_metrics(ray_local, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    # MLflow >= 3.x keeps the file store behind this switch (a database URI needs no switch).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    store = f"file://{tmp_path}/mlruns"
    space = parse_space({"search": {"partition.sigma": {"grid": [0.5]}}, "metric": "emotion/Acc-4",
                         "resources": {"max_concurrent": 2, "trial_cpus": 0.5}}, "mlflow.yaml")
    base = driver.base_config_dict(space, output_dir=str(tmp_path / "runs"), downstream=["imagefolder:e=/x"],
                                   overrides=[f"tracking.mlflow_uri={store}"])

    def factory(trial_configs, sweep_dir, driver_cwd, report_epochs):
        def trainable(config):
            import ray.tune

            ray.tune.report({"emotion/Acc-4": 50 + config["partition.sigma"], "evaluated": 1})

        return trainable

    driver.run_sweep(space, base, "mlflow", trainable_factory=factory, prepare=False, log=lambda _: None)
    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("mlflow")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"adopted,objective=pacl,sigma=0.7,K=2,tau=0.07",
                         "partition.sigma=0.5,objective=pacl,sigma=0.5,K=2,tau=0.07"}
    run = runs["partition.sigma=0.5,objective=pacl,sigma=0.5,K=2,tau=0.07"]
    assert run.data.params["partition.sigma"] == "0.5" and run.data.params["train.temperature"] == "0.07"
    assert run.data.metrics["emotion/Acc-4"] == pytest.approx(50.5)


def test_wandb_offline_runs_hold_hyperparameters_and_metrics(ray_local, tmp_path, monkeypatch):
    """W&B through Ray Tune's WandbLoggerCallback in offline mode (no account, no network): one
    run folder per trial under the sweep's wandb/, named like the trial, whose transaction log
    holds the trial's hyperparameters and reported metrics (read back with W&B's own
    ``wandb leet inspect --summary --json``). Skipped where wandb is not installed."""
    pytest.importorskip("wandb")
    import subprocess

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    space = parse_space({"search": {"partition.sigma": {"grid": [0.5]}}, "metric": "emotion/Acc-4",
                         "resources": {"max_concurrent": 2, "trial_cpus": 0.5}}, "wandb.yaml")
    base = driver.base_config_dict(space, output_dir=str(tmp_path / "runs"), downstream=["imagefolder:e=/x"],
                                   overrides=["tracking.wandb_project=pacl-test"])

    def factory(trial_configs, sweep_dir, driver_cwd, report_epochs):
        def trainable(config):
            import ray.tune

            ray.tune.report({"emotion/Acc-4": 50 + config["partition.sigma"], "evaluated": 1})

        return trainable

    lines: list[str] = []
    driver.run_sweep(space, base, "wandb", trainable_factory=factory, prepare=False, log=lines.append)
    wandb_dir = tmp_path / "runs" / "sweeps" / "wandb" / "wandb"
    assert f"[tune] W&B offline runs: {wandb_dir} (upload with `wandb sync <run folder>`)" in lines
    runs = {}
    for run in sorted(wandb_dir.glob("offline-run-*")):
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(run)],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        record = json.loads(out)
        runs[record["name"]] = record
    assert set(runs) == {"adopted,objective=pacl,sigma=0.7,K=2,tau=0.07",
                         "partition.sigma=0.5,objective=pacl,sigma=0.5,K=2,tau=0.07"}
    run = runs["partition.sigma=0.5,objective=pacl,sigma=0.5,K=2,tau=0.07"]
    assert run["project"] == "pacl-test" and run["state"] == "finished"
    assert run["config"]["partition.sigma"] == 0.5 and run["config"]["train.temperature"] == 0.07
    assert run["config"]["trial"] == "partition.sigma=0.5"
    assert run["summary"]["emotion/Acc-4"] == pytest.approx(50.5)
