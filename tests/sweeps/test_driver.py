"""The sweep driver: space lookup, config layering, cache keys shared by trials, the Table-5 report,
resume of an interrupted sweep, and a tiny sweep end to end."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from pacl_ray.stages import cache
from pacl_ray import cli, config
from pacl_ray.formats import storage
from pacl_ray.sweeps import driver
from pacl_ray.sweeps import report as sweep_report
from pacl_ray.sweeps.spaces import SpaceError, Trial, expand_trials, load_space, parse_space

REPO = Path(__file__).resolve().parents[2]
INGEST = cache.StageOutput("ingest", "ingestkey", "/runs/stages/ingest/ingestkey", False)
EMBED = cache.StageOutput("embed", "embedkey", "/runs/stages/embed/embedkey", False)
SCORES = cache.StageOutput("scores", "scoreskey", "/runs/stages/scores/scoreskey", False)


def sweep_configs(space_name: str, tmp_path, **kwargs) -> tuple[list[Trial], dict[str, config.RunConfig]]:
    """The trials and resolved trial configs that the driver builds for a shipped space."""
    space = load_space(driver.resolve_space_path(space_name))
    base = driver.base_config_dict(space, output_dir=str(tmp_path), **kwargs)
    trials = expand_trials(space, base)
    ks = driver.sweep_ks(base, trials)
    return trials, {t.name: config.from_dict(driver.trial_config_dict(base, t, ks)) for t in trials}


# --------------------------------------------------------------------------- space lookup


def test_space_names_resolve_from_cwd_then_the_repository(tmp_path, monkeypatch):
    expected = str(REPO / "tune_spaces" / "table5_sigma.yaml")
    monkeypatch.chdir(tmp_path)  # not a checkout: falls back to the repo beside the package
    for name in ("table5_sigma", "table5_sigma.yaml", "tune_spaces/table5_sigma.yaml"):
        assert driver.resolve_space_path(name) == expected
    local = tmp_path / "tune_spaces" / "table5_sigma.yaml"
    local.parent.mkdir()
    local.write_text("mode: product\n")
    assert driver.resolve_space_path("table5_sigma") == str(local)  # the working directory wins
    with pytest.raises(SpaceError) as err:
        driver.resolve_space_path("nope")
    names = ", ".join(sorted(p.stem for p in (REPO / "tune_spaces").glob("*.yaml")))  # cwd's and the repo's
    assert str(err.value) == f"space 'nope' not found; names in tune_spaces/: {names}; or a path to a YAML file"
    with pytest.raises(SpaceError) as err:
        driver.resolve_space_path("table5_sigmaa")
    assert str(err.value).startswith("space 'table5_sigmaa' not found; did you mean table5_sigma")


# --------------------------------------------------------------------------- configs


def test_world_flags_choose_the_world(monkeypatch, tmp_path):
    import pacl_ray.stages.runtime
    import pacl_ray.world.build

    class Chosen(Exception):
        pass

    def ensure_world(cache_dir=None, seed=0, size="default", progress=True):
        raise Chosen(cache_dir, seed, size)

    monkeypatch.setattr(pacl_ray.world.build, "ensure_world", ensure_world)
    monkeypatch.setattr(pacl_ray.stages.runtime, "init_ray", lambda cfg=None: None)
    with pytest.raises(Chosen) as chosen:
        cli.main(["tune", "--world", "tiny", "--world-seed", "3", "--world-dir", str(tmp_path)])
    assert chosen.value.args == (str(tmp_path), 3, "tiny")
    with pytest.raises(Chosen) as chosen:
        cli.main(["tune"])
    assert chosen.value.args == (None, 0, "default")


def test_base_config_layers_world_file_fixed_sets_and_flags(tmp_path):
    space = parse_space({"fixed": {"train": {"epochs": 3, "temperature": 0.05}},
                         "downstream": ["imagefolder:space=/space"]})
    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump({"train": {"epochs": 9, "lr_heads": 0.5}, "seed": 4}))
    world = {"train": {"epochs": 1, "global_batch_size": 8}, "ingest": {"manifest": "/world/pairs.jsonl"},
             "evaluate": {"tasks": ["imagefolder:world=/w"]}}
    base = driver.base_config_dict(space, world_overrides=world, config_file=str(user),
                                 overrides=["train.temperature=0.2"], output_dir="runs-rel")
    assert base["train"]["global_batch_size"] == 8  # world
    assert base["train"]["lr_heads"] == 0.5 and base["seed"] == 4  # --config over the world
    assert base["train"]["epochs"] == 3  # the space's fixed over --config
    assert base["train"]["temperature"] == 0.2  # --set over fixed
    assert base["evaluate"]["tasks"] == ["imagefolder:space=/space"]  # the space's downstream
    assert base["ingest"]["manifest"] == "/world/pairs.jsonl"
    assert os.path.isabs(base["output_dir"])  # trials may run in another working directory
    real = driver.base_config_dict(space, world_overrides=world, data="/data/pairs.jsonl",
                                 downstream=["single:fi=/data/FI"])
    assert real["ingest"]["manifest"] == "/data/pairs.jsonl"
    assert real["evaluate"]["tasks"] == ["single:fi=/data/FI"]
    with pytest.raises(config.ConfigError, match="train.epochz"):
        driver.base_config_dict(space, overrides=["train.epochz=3"])


def test_real_data_defaults_are_the_papers_models(tmp_path):
    _, configs = sweep_configs("table5", tmp_path, data="/data/pairs.jsonl", downstream=["single:fi=/data/FI"])
    cfg = configs["adopted"]
    assert cfg.partition.clip_model == "ViT-B-32" and cfg.partition.clip_pretrained == "openai"
    assert cfg.partition.sentiment_model == "finiteautomata/bertweet-base-sentiment-analysis"
    assert cfg.model.backbone == "resnet50" and cfg.model.text_encoder == "Yaxin/roberta-large-ernie2-skep-en"
    assert (cfg.partition.sigma, cfg.train.k, cfg.train.temperature) == (0.7, 2, 0.07)
    assert (cfg.train.epochs, cfg.train.global_batch_size) == (30, 64)
    assert configs["baseline:vanilla"].train.objective == "clip"


# --------------------------------------------------------------------------- cache keys


def test_sigma_sweep_scores_once_and_a_model_change_rescores(tmp_path):
    from pacl_ray.stages.partition import partition_key
    from pacl_ray.stages.scoring import scoring_key

    _, configs = sweep_configs("table5_sigma", tmp_path)
    assert len({c.partition.sigma for c in configs.values()}) == 6
    assert len({scoring_key(c, INGEST) for c in configs.values()}) == 1  # sigma is not in the key
    assert len({partition_key(c, SCORES) for c in configs.values()}) == 6  # thresholding is per sigma
    other = config.from_dict(config.apply_overrides(config.to_dict(configs["adopted"]),
                                                    ["partition.clip_model=ViT-B-16"]))
    assert scoring_key(other, INGEST) != scoring_key(configs["adopted"], INGEST)
    other = config.from_dict(config.apply_overrides(config.to_dict(configs["adopted"]),
                                                    ["partition.sentiment_model=bert-base-uncased"]))
    assert scoring_key(other, INGEST) != scoring_key(configs["adopted"], INGEST)


def test_k_sweep_clusters_once_for_every_k(tmp_path):
    from pacl_ray.stages.pseudo_labels import cluster_key
    from pacl_ray.stages.embed import embed_key

    _, configs = sweep_configs("table5_k", tmp_path)
    assert {c.train.k for c in configs.values()} == {2, 3, 6, 10, 15, 25}
    assert all(c.cluster.ks == [2, 3, 6, 10, 15, 25] for c in configs.values())
    assert len({cluster_key(c, EMBED) for c in configs.values()}) == 1
    assert len({embed_key(c, INGEST) for c in configs.values()}) == 1


def test_tau_sweep_reuses_scores_partition_and_clusters(tmp_path):
    from pacl_ray.stages.pseudo_labels import cluster_key
    from pacl_ray.stages.partition import partition_key
    from pacl_ray.stages.scoring import scoring_key

    _, configs = sweep_configs("table5_tau", tmp_path)
    assert len({c.train.temperature for c in configs.values()}) == 5
    for key_fn, upstream in ((scoring_key, INGEST), (partition_key, SCORES), (cluster_key, EMBED)):
        assert len({key_fn(c, upstream) for c in configs.values()}) == 1


def test_fingerprint_tracks_the_trial_list(tmp_path):
    _, sigma = sweep_configs("table5_sigma", tmp_path)
    _, again = sweep_configs("table5_sigma", tmp_path)
    _, tau = sweep_configs("table5_tau", tmp_path)
    as_dicts = lambda cfgs: {k: config.to_dict(v) for k, v in cfgs.items()}  # noqa: E731
    assert driver.sweep_fingerprint(as_dicts(sigma)) == driver.sweep_fingerprint(as_dicts(again))
    assert driver.sweep_fingerprint(as_dicts(sigma)) != driver.sweep_fingerprint(as_dicts(tau))


# --------------------------------------------------------------------------- resources


@pytest.mark.parametrize("resources, gpu, cpus, gpus, expected", [
    ({}, False, 2, 0, 1),  # 1 CPU worker per trial + 1 CPU for the trial process
    ({"trial_cpus": 0.5}, False, 3, 0, 2),
    ({"workers_per_trial": 4}, True, 16, 8, 2),
    ({"workers_per_trial": 4, "trial_gpus": 1}, True, 16, 8, 1),
    ({"workers_per_trial": 2}, True, 4, 0, 1),  # autoscaling cluster with no GPU node yet
    ({"max_concurrent": 3}, True, 4, 64, 3),
    ({}, False, 64, 0, 5),  # never more than the trials
    ({"workers_per_trial": 2}, False, 4, 0, 1),
])
def test_max_concurrent_trials(resources, gpu, cpus, gpus, expected):
    space = parse_space({"resources": resources})
    assert driver.max_concurrent_trials(space, 5, gpu, cpus, gpus) == expected


# --------------------------------------------------------------------------- report


def evaluate_row(dataset: str, acc: float, f1: float, protocol: str = "linear") -> dict:
    """A row shaped like pacl_ray.evaluation.evaluate's."""
    return {"model": "m", "protocol": protocol, "prompt": "", "task": f"imagefolder:{dataset}=/x",
            "dataset": dataset, "kind": "single", "backbone": "test_resnet", "checkpoint": "/c",
            "Acc-4": acc, "F1-4": f1, "best_epoch": 3, "val_score": 0.1, "n_train": 10, "quarantined": 0}


def test_flatten_rows_keeps_metric_columns_per_dataset():
    rows = [evaluate_row("emotion", 61.5, 60.25), evaluate_row("fi", 40.0, 39.0),
            evaluate_row("emotion", 70.0, 69.0, protocol="finetune")]
    assert driver.flatten_rows(rows) == {
        "emotion/Acc-4": 61.5, "emotion/F1-4": 60.25, "fi/Acc-4": 40.0, "fi/F1-4": 39.0,
        "emotion-finetune/Acc-4": 70.0, "emotion-finetune/F1-4": 69.0,
    }


def sigma_outcomes() -> tuple[object, dict, list[sweep_report.TrialOutcome], dict]:
    space = parse_space({
        "fixed": {"partition": {"sigma": 0.7}},
        "search": {"partition.sigma": {"grid": [0.3, 0.7, 1.0]}, "train.temperature": {"grid": [0.01, 0.5]}},
        "baselines": {"vanilla": {"train.objective": "clip"}},
        "metric": {"name": "emotion/Acc-4", "mode": "max"},
    }, "tiny.yaml")
    base = config.to_dict(config.from_dict(space.fixed))
    trials = expand_trials(space, base)
    scores = {"adopted": 60.0, "partition.sigma=0.3": 55.0, "partition.sigma=1": 40.0,
              "train.temperature=0.01": 62.0, "train.temperature=0.5": 58.0, "baseline:vanilla": 70.0}
    outcomes = [sweep_report.TrialOutcome(t, {"emotion/Acc-4": scores[t.name], "emotion/F1-4": scores[t.name] - 1},
                                  backbone=f"/runs/{t.name}/backbone.safetensors") for t in trials]
    outcomes[2] = sweep_report.TrialOutcome(trials[2], error="RuntimeError: out of memory")
    configs = {t.name: driver.trial_config_dict(base, t, [2]) for t in trials}
    return space, base, outcomes, configs


def test_table_has_the_table5_layout():
    space, base, outcomes, _ = sigma_outcomes()
    rows = sweep_report.table_rows(space, base, outcomes, initial={"emotion/Acc-4": 30.0, "emotion/F1-4": 29.0})
    layout = [(r["hyperparameter"], r["value"]) for r in rows]
    assert layout == [
        ("partition.sigma", "0.3"), ("partition.sigma", "0.7 (adopted)"), ("partition.sigma", "1"),
        ("train.temperature", "0.01"), ("train.temperature", "0.07 (adopted)"), ("train.temperature", "0.5"),
        ("baseline", "vanilla (train.objective=clip)"), ("initial backbone", "before training"),
    ]
    # the adopted trial's result appears in both blocks
    assert rows[1]["metrics"] == rows[4]["metrics"] == {"emotion/Acc-4": 60.0, "emotion/F1-4": 59.0}
    columns = sweep_report.metric_columns(outcomes)
    assert columns == ["emotion/Acc-4", "emotion/F1-4"]
    markdown = sweep_report.results_markdown(rows, columns)
    lines = markdown.splitlines()
    assert lines[0] == "| hyperparameter | value | emotion/Acc-4 | emotion/F1-4 |"
    assert lines[2] == "| partition.sigma | 0.3 | 55.00 | 54.00 |"
    assert lines[3] == "|  | 0.7 (adopted) | 60.00 | 59.00 |"
    assert "failed: RuntimeError: out of memory" in lines[4]
    parsed = list(csv.DictReader(io.StringIO(sweep_report.results_csv(rows, columns))))
    assert [r["value"] for r in parsed][:3] == ["0.3", "0.7 (adopted)", "1"]
    assert parsed[0]["emotion/Acc-4"] == "55.0" and parsed[0]["backbone"].endswith("sigma=0.3/backbone.safetensors")
    assert parsed[2]["error"].startswith("RuntimeError")


def test_summary_table_has_each_trials_start_to_first_step(tmp_path):
    """Issue 21: the seconds from each trial's start to its first training step (reported by the
    trial with its evaluation) are a column of the printed table, results.csv and trials.json."""
    space, base, outcomes, configs = sigma_outcomes()

    class Result:  # what collect_outcomes reads of each Tune result
        def __init__(self, name, metrics):
            self.config, self.metrics, self.error = {"trial": name}, metrics, None

    trials = [o.trial for o in outcomes]
    startup = {"adopted": 9.25, "partition.sigma=0.3": 11.5}  # the others trained nothing here (cached)
    grid = [Result(t.name, {"emotion/Acc-4": 50.0, "evaluated": 1, "backbone_checkpoint": f"/runs/{t.name}",
                            **({"start_to_first_step_s": startup[t.name], "driver_setup_s": 2.0}
                               if t.name in startup else {})}) for t in trials]
    outcomes = driver.collect_outcomes(grid, trials)
    assert {o.trial.name: o.start_to_first_step_s for o in outcomes} == {
        t.name: startup.get(t.name) for t in trials}
    assert all(set(o.metrics) == {"emotion/Acc-4"} for o in outcomes)  # not a metric column

    rows = sweep_report.table_rows(space, base, outcomes)
    markdown = sweep_report.results_markdown(rows, ["emotion/Acc-4"]).splitlines()
    assert markdown[0] == f"| hyperparameter | value | emotion/Acc-4 | {sweep_report.STARTUP_COLUMN} |"
    assert markdown[2] == "| partition.sigma | 0.3 | 50.00 | 11.5 |"
    assert markdown[3] == "|  | 0.7 (adopted) | 50.00 | 9.2 |"
    assert markdown[4] == "|  | 1 | 50.00 | - |"
    parsed = list(csv.DictReader(io.StringIO(sweep_report.results_csv(rows, ["emotion/Acc-4"]))))
    assert [r["start_to_first_step_s"] for r in parsed[:3]] == ["11.5", "9.25", ""]

    report = sweep_report.write_report(space, base, configs, outcomes, str(tmp_path / "sweep"))
    assert sweep_report.STARTUP_COLUMN in report.markdown
    trials_json = json.loads(storage.read_text(str(tmp_path / "sweep" / "trials.json")))["trials"]
    assert {t["name"]: t["start_to_first_step_s"] for t in trials_json}["partition.sigma=0.3"] == 11.5
    # On a seed axis a row shows the mean over its seeds that trained.
    seeds = [sweep_report.TrialOutcome(Trial(f"adopted@seed={s}", {}, seed=s, repeat_of="adopted"), {"e/Acc-4": 1.0},
                                       start_to_first_step_s=value) for s, value in ((0, 10.0), (1, 12.0), (2, None))]
    assert sweep_report.aggregate_seeds(seeds)[0].start_to_first_step_s == pytest.approx(11.0)


def test_best_config_ignores_baselines_and_follows_the_mode():
    _, _, outcomes, _ = sigma_outcomes()
    assert sweep_report.best_outcome(outcomes, "emotion/Acc-4", "max").trial.name == "train.temperature=0.01"
    assert sweep_report.best_outcome(outcomes, "emotion/Acc-4", "min").trial.name == "partition.sigma=0.3"
    assert sweep_report.best_outcome(outcomes, "missing/Acc-4", "max") is None


def test_write_report_files(tmp_path):
    space, base, outcomes, configs = sigma_outcomes()
    sweep_dir = f"file://{tmp_path}/sweeps/tiny"  # through a pyarrow filesystem URI
    report = sweep_report.write_report(space, base, configs, outcomes, sweep_dir, initial={"emotion/Acc-4": 30.0})
    for name in ("results.md", "results.csv", "best_config.yaml", "trials.json",
                 "plot_partition_sigma.png", "plot_train_temperature.png"):
        assert storage.exists(storage.join(sweep_dir, name)), name
    png = storage.read_bytes(storage.join(sweep_dir, "plot_train_temperature.png"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    best = config.load_config(storage.join(sweep_dir, "best_config.yaml"))
    assert best.train.temperature == 0.01 and best.partition.sigma == 0.7
    trials = json.loads(storage.read_text(storage.join(sweep_dir, "trials.json")))
    assert trials["best"] == "train.temperature=0.01" and trials["metric"] == "emotion/Acc-4"
    assert {t["name"]: t["backbone_checkpoint"] for t in trials["trials"]}["adopted"] == "/runs/adopted/backbone.safetensors"
    assert report.metric == "emotion/Acc-4" and report.best.trial.name == "train.temperature=0.01"


def test_metric_names_resolve_to_result_columns():
    columns = ["emotion/Acc-4", "emotion/F1-4", "fi/Acc-8"]
    assert sweep_report.resolve_metric("emotion/Acc-4", columns) == "emotion/Acc-4"
    assert sweep_report.resolve_metric("emotion/Acc", columns) == "emotion/Acc-4"  # any class count
    assert sweep_report.resolve_metric("fi/Acc", columns) == "fi/Acc-8"
    assert sweep_report.resolve_metric("emotion/Acc-6", columns) == ""


def test_default_metric_is_the_first_accuracy():
    assert sweep_report.default_metric(["fi/F1-8", "fi/Acc-8", "e6/Acc-6"]) == "fi/Acc-8"
    assert sweep_report.default_metric(["emotic/mAP"]) == "emotic/mAP"


# --------------------------------------------------------------------------- resume


def counting_factory(log_dir: str, fail_flag: str, fail_trial: str):
    """A stand-in trainable: records each run, fails ``fail_trial`` while ``fail_flag`` exists."""

    def factory(trial_configs, sweep_dir, driver_cwd, report_epochs):
        def trainable(config):
            import ray.tune

            name = config["trial"]
            with open(os.path.join(log_dir, name.replace(":", "_")), "a") as handle:
                handle.write("run\n")
            if name == fail_trial and os.path.exists(fail_flag):
                raise RuntimeError("node lost")
            sigma = trial_configs[name]["partition"]["sigma"]
            ray.tune.report({"emotion/Acc-4": 50 + sigma, "emotion/F1-4": 49 + sigma, "evaluated": 1,
                             "backbone_checkpoint": f"/b/{name}"})

        return trainable

    return factory


def runs_of(log_dir, name: str) -> int:
    path = Path(log_dir) / name.replace(":", "_")
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_local, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    space = parse_space({
        "search": {"partition.sigma": {"grid": [0.5, 0.7]}},
        "metric": "emotion/Acc-4", "resources": {"max_concurrent": 2, "trial_cpus": 0.5},
        "max_failures": 0,
    }, "resume.yaml")
    base = driver.base_config_dict(space, output_dir=str(tmp_path / "runs"), downstream=["imagefolder:e=/x"])
    log_dir, flag = tmp_path / "log", tmp_path / "fail"
    log_dir.mkdir()
    flag.write_text("")
    factory = counting_factory(str(log_dir), str(flag), "partition.sigma=0.5")
    kwargs = dict(trainable_factory=factory, prepare=False, log=lambda _: None)

    outcomes, _, _ = driver.run_sweep(space, base, "resume", **kwargs)
    assert {o.trial.name: bool(o.error) for o in outcomes} == {"adopted": False, "partition.sigma=0.5": True}

    flag.unlink()
    outcomes, report, _ = driver.run_sweep(space, base, "resume", **kwargs)
    assert [o.error for o in outcomes] == ["", ""]
    assert runs_of(log_dir, "adopted") == 1  # finished: kept, not re-run
    assert runs_of(log_dir, "partition.sigma=0.5") == 2
    assert report.best.trial.name == "adopted"  # 50.7 > 50.5
    # Tune sees the hyperparameters, not only the trial's name
    best = report.result_grid.get_best_result("emotion/Acc-4", "max")
    assert best.config["trial"] == "adopted" and best.config["partition.sigma"] == 0.7
    assert {r.config["partition.sigma"] for r in report.result_grid} == {0.5, 0.7}
    assert best.config["train.temperature"] == 0.07 and best.config["train.objective"] == "pacl"

    driver.run_sweep(space, base, "resume", resume=False, **kwargs)
    assert runs_of(log_dir, "adopted") == 2  # --no-resume starts over


# --------------------------------------------------------------------------- end to end


@pytest.mark.timeout(900)  # world generation + every stage; about a minute, more on a loaded machine
def test_tiny_sweep_end_to_end(ray_local, tmp_path, capsys):
    """`python -m pacl_ray.tune` on the tiny embedded world: 2 trials of 1 epoch, then a relaunch
    that resumes the finished sweep instead of training again."""
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump({
        "fixed": {"train": {"epochs": 1, "global_batch_size": 16},
                  "evaluate": {"linear_epochs": 3, "batch_size": 32}},
        "search": {"partition.sigma": {"grid": [0.3, 0.5]}},  # the world's adopted sigma is 0.5
        "metric": {"name": "emotion/Acc", "mode": "max"},
        "resources": {"max_concurrent": 2, "trial_cpus": 0.5},
    }))
    output = tmp_path / "runs"
    # The world itself is generated once into its default cache ($PACL_RAY_CACHE or ~/.cache) and
    # shared with other tests; everything the sweep writes goes to tmp_path.
    argv = ["--space", str(space), "--world", "tiny", "--output-dir", str(output), "--name", "tiny"]
    assert cli.main(["tune", *argv]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    sweep = output / "sweeps" / "tiny"
    # What the user read (tests/test_console.py): no traceback, dict repr or line over 200
    # characters, each shared stage's summary once, the config as a path, not a dump.
    from test_console import console_problems

    problems = console_problems(captured.out + captured.err, summaries=(
        "ingest:", "scores:", "embed:", "cluster:", "== Sweep tiny", "== Best config"))
    assert problems == [], "\n".join(problems)
    assert f"resolved config: {sweep / 'config.yaml'}" in printed and (sweep / "config.yaml").is_file()
    assert "train:\n" not in printed  # no YAML dump on the console
    # Tune's ResultGrid holds each trial's hyperparameters
    grid = __import__("ray").tune.ResultGrid(__import__("ray").tune.ExperimentAnalysis(
        json.loads((sweep / "sweep.json").read_text())["experiment"]))
    assert {r.config["trial"]: r.config["partition.sigma"] for r in grid} == {"adopted": 0.5, "partition.sigma=0.3": 0.3}
    assert all(r.config["train.k"] == 2 and r.config["train.objective"] == "pacl" for r in grid)
    # TensorBoard: one named run per trial with its evaluation metrics
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted(p.name for p in (sweep / "tensorboard").iterdir())
    assert runs == ["adopted,objective=pacl,sigma=0.5,K=2,tau=0.07",
                    "partition.sigma=0.3,objective=pacl,sigma=0.3,K=2,tau=0.07"]
    events = EventAccumulator(str(sweep / "tensorboard" / runs[0])).Reload()
    assert any(tag.startswith("eval/emotion/Acc-") for tag in events.Tags()["scalars"])
    assert re.search(r"\| hyperparameter \| value \| emotion/Acc-(\d+) \| emotion/F1-\1 \|", printed)
    assert "0.5 (adopted)" in printed and "initial backbone" in printed
    assert "== Best config" in printed and "affective gap" in printed.lower()
    rows = list(csv.DictReader(io.StringIO((sweep / "results.csv").read_text())))
    assert [r["value"] for r in rows] == ["0.3", "0.5 (adopted)", "before training"]
    accuracy = next(c for c in rows[0] if c.startswith("emotion/Acc-"))
    assert all(0 <= float(r[accuracy]) <= 100 for r in rows)
    trials = json.loads((sweep / "trials.json").read_text())["trials"]
    assert all(Path(t["backbone_checkpoint"]).is_file() for t in trials)
    assert (sweep / "plot_partition_sigma.png").is_file() and (sweep / "best_config.yaml").is_file()
    stages = output / "stages"
    count = lambda stage: len([p for p in (stages / stage).iterdir() if (p / "_SUCCESS").exists()])  # noqa: E731
    # a sigma sweep scores and clusters once, thresholds and trains per sigma
    assert count("scores") == 1 and count("cluster") == 1
    assert count("partition") == 2 and count("train") == 2
    # Issue 21: one CPU worker per trial trains in the trial process (no Ray Train run), and the
    # summary gives each trial's seconds from its start to its first training step.
    for run in (stages / "train").iterdir():
        assert (run / "checkpoints").is_dir() and not (run / "ray_train").exists()
    assert f"| {sweep_report.STARTUP_COLUMN} |" in printed
    assert all(float(r["start_to_first_step_s"]) > 0 for r in rows[:2]) and rows[2]["start_to_first_step_s"] == ""

    assert cli.main(["tune", *argv]) == 0  # relaunch: restored, nothing retrained
    assert "resuming" in capsys.readouterr().out
    assert count("train") == 2


def test_a_seed_axis_yields_mean_and_spread_per_row():
    """Issue 23: seeds are part of a space; the results table averages them into one row per
    trial with the mean and sample standard deviation (synthetic outcomes, no Ray)."""
    space = parse_space({
        "search": {"partition.sigma": {"grid": [0.3, 0.7]}, "seed": {"grid": [0, 1, 2]}},
        "fixed": {"partition": {"sigma": 0.7}},
        "baselines": {"vanilla": {"train.objective": "clip"}},
        "metric": {"name": "emotion/Acc-4", "mode": "max"},
    }, "seeds.yaml")
    assert space.seeds == (0, 1, 2) and "seed" not in space.search
    base = config.to_dict(config.from_dict(space.fixed))
    trials = expand_trials(space, base)
    assert [t.name for t in trials] == [f"{row}@seed={s}" for row in ("adopted", "partition.sigma=0.3", "baseline:vanilla")
                                        for s in (0, 1, 2)]
    configs = {t.name: driver.trial_config_dict(base, t, [2]) for t in trials}
    assert [configs[f"partition.sigma=0.3@seed={s}"]["seed"] for s in (0, 1, 2)] == [0, 1, 2]
    assert configs["partition.sigma=0.3@seed=2"]["partition"]["sigma"] == 0.3

    acc = {"adopted": [60.0, 62.0, 64.0], "partition.sigma=0.3": [50.0, 50.0, 56.0], "baseline:vanilla": [70.0, 71.0, 72.0]}
    outcomes = [sweep_report.TrialOutcome(t, {"emotion/Acc-4": acc[t.group][t.seed]}, backbone=f"/runs/{t.name}")
                for t in trials]
    outcomes[5] = sweep_report.TrialOutcome(trials[5], error="RuntimeError: out of memory")  # sigma=0.3, seed 2 failed
    rows = sweep_report.table_rows(space, base, outcomes)
    by_value = {r["value"]: r for r in rows}
    adopted = by_value["0.7 (adopted)"]
    assert adopted["metrics"]["emotion/Acc-4"] == pytest.approx(62.0)
    assert adopted["spread"]["emotion/Acc-4"] == pytest.approx(2.0)  # sample std of 60, 62, 64
    assert adopted["seeds"] == [0, 1, 2] and adopted["trial"] == "adopted"
    partial = by_value["0.3"]
    assert partial["metrics"]["emotion/Acc-4"] == pytest.approx(50.0) and partial["spread"]["emotion/Acc-4"] == 0.0
    assert partial["error"].startswith("1 of 3 seeds failed: RuntimeError")
    assert by_value["vanilla (train.objective=clip)"]["metrics"]["emotion/Acc-4"] == pytest.approx(71.0)

    columns = sweep_report.metric_columns(outcomes)
    markdown = sweep_report.results_markdown(rows, columns).splitlines()
    assert markdown[0] == "| hyperparameter | value | emotion/Acc-4 | seeds |"
    assert "| 0.7 (adopted) | 62.00 ± 2.00 | 3 |" in markdown[3]
    parsed = list(csv.DictReader(io.StringIO(sweep_report.results_csv(rows, columns))))
    row = next(r for r in parsed if r["value"] == "0.7 (adopted)")
    assert float(row["emotion/Acc-4"]) == pytest.approx(62.0) and float(row["emotion/Acc-4 std"]) == pytest.approx(2.0)
    assert row["seeds"] == "0 1 2"
    # The best row is chosen by its mean over seeds (baselines excluded).
    assert sweep_report.best_outcome(sweep_report.aggregate_seeds(outcomes), "emotion/Acc-4", "max").trial.name == "adopted"


def test_seed_axis_forms_and_errors():
    base = config.to_dict(config.from_dict({"seed": 5}))
    space = parse_space({"repeats": 2, "search": {"train.k": {"grid": [3]}}}, "r.yaml")
    assert [(t.name, t.seed) for t in expand_trials(space, base)] == [
        ("adopted@seed=5", 5), ("adopted@seed=6", 6), ("train.k=3@seed=5", 5), ("train.k=3@seed=6", 6)]
    assert parse_space({"seeds": [3, 1]}, "s.yaml").seeds == (3, 1)
    for bad, message in [({"seeds": [1, 1]}, "repeated seeds"), ({"seeds": ["a"]}, r"seeds\[0\]"),
                         ({"seeds": [1], "search": {"seed": {"grid": [2]}}}, "not both"),
                         ({"search": {"seed": {"uniform": [0, 3]}}}, "the seed axis is a grid"),
                         ({"seeds": [0], "repeats": 2}, "either seeds")]:
        with pytest.raises(SpaceError, match=message):
            parse_space(bad, "bad.yaml")
    # Without a seed axis nothing changes: trials keep their names and no seed override.
    plain = expand_trials(parse_space({"search": {"train.k": {"grid": [3]}}}, "p.yaml"), base)
    assert [t.name for t in plain] == ["adopted", "train.k=3"] and all("seed" not in t.overrides for t in plain)


def test_one_value_axes_get_no_plot(tmp_path):
    """An axis searched at one value gets no plot (a lone point is not a curve)."""
    space = parse_space({"search": {"partition.sigma": {"grid": [0.7]}}, "metric": "emotion/Acc-4"}, "one.yaml")
    base = config.to_dict(config.from_dict({}))
    trials = expand_trials(space, base)
    outcomes = [sweep_report.TrialOutcome(t, {"emotion/Acc-4": 50.0}) for t in trials]
    configs = {t.name: driver.trial_config_dict(base, t, [2]) for t in trials}
    report = sweep_report.write_report(space, base, configs, outcomes, str(tmp_path / "one"))
    assert report.plots == [] and not (tmp_path / "one" / "plot_partition_sigma.png").exists()


# --------------------------------------------------------------------------- ASHA


def test_asha_without_the_validation_probe_stops_before_ray_starts(tmp_path, monkeypatch):
    from pacl_ray.stages import runtime

    monkeypatch.setattr(runtime, "init_ray", lambda *_: pytest.fail("Ray started"))
    space = tmp_path / "asha.yaml"
    space.write_text(yaml.safe_dump({"asha": {"grace_period": 1}, "search": {"partition.sigma": {"grid": [0.3]}}}))
    with pytest.raises(SpaceError, match=r"asha.yaml: asha: ASHA ranks trials on val_acc.*validation.every_epochs=0"):
        driver.run_tune(str(space), output_dir=str(tmp_path / "runs"))
    # with data of one's own, the probe's task is checked up front too
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("")
    with pytest.raises(SpaceError, match=r"the validation probe needs a labelled task: set validation.task="):
        driver.run_tune(str(space), data=str(manifest), output_dir=str(tmp_path / "runs"),
                        overrides=["validation.every_epochs=1"])


@pytest.mark.slow  # a 2-trial, 2-epoch sweep on the tiny world: several minutes on a loaded 2-core machine
@pytest.mark.timeout(1200)
def test_tiny_asha_sweep_ranks_on_the_validation_probe(ray_local, tmp_path):
    """ASHA on the tiny embedded world: every result Tune sees while training carries val_acc (the
    held-out kNN probe), and the sweep finishes with its evaluated (or early-stopped) trials."""
    import ray.tune

    space = tmp_path / "asha.yaml"
    space.write_text(yaml.safe_dump({
        "fixed": {"train": {"epochs": 2, "global_batch_size": 16},
                  "evaluate": {"linear_epochs": 3, "batch_size": 32},
                  "validation": {"every_epochs": 1, "max_images": 24, "k": 5}},
        "search": {"partition.sigma": {"grid": [0.3, 0.5]}},
        "metric": {"name": "emotion/Acc", "mode": "max"},
        "resources": {"max_concurrent": 1, "trial_cpus": 0.5},  # one at a time: memory of a shared CI box
        "asha": {"grace_period": 1, "reduction_factor": 2},
    }))
    output = tmp_path / "runs"
    assert cli.main(["tune", "--space", str(space), "--world", "tiny", "--output-dir", str(output),
                     "--name", "asha"]) == 0
    sweep = output / "sweeps" / "asha"
    grid = ray.tune.ResultGrid(ray.tune.ExperimentAnalysis(json.loads((sweep / "sweep.json").read_text())["experiment"]))
    assert {r.config["trial"] for r in grid} == {"adopted", "partition.sigma=0.3"}
    for result in grid:
        frame = result.metrics_dataframe
        training = frame[frame["epoch"].notna()]  # reports made while training (with checkpoints)
        assert len(training) >= 1 and training["val_acc"].between(0, 100).all()
        assert set(training["epoch"]) <= {1, 2}
    outcomes = json.loads((sweep / "trials.json").read_text())["trials"]
    assert any(Path(t["backbone_checkpoint"]).is_file() for t in outcomes)
