"""Search-space parsing, validation and expansion (pure; no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pacl_ray import config
from pacl_ray.sweeps.spaces import (
    ASHA_METRICS, Domain, SpaceError, Trial, apply_dotted, check_asha, check_metric, expand_trials, load_space,
    parse_space, result_columns,
)

REPO = Path(__file__).resolve().parents[2]
PAPER_GRIDS = {
    "partition.sigma": [0, 0.3, 0.5, 0.7, 0.9, 1],
    "train.k": [2, 3, 6, 10, 15, 25],
    "train.temperature": [0.01, 0.03, 0.05, 0.07, 0.5],
}
ADOPTED = {"partition.sigma": 0.7, "train.k": 2, "train.temperature": 0.07}


def base_of(space) -> dict:
    return config.to_dict(config.from_dict(space.fixed))


def test_full_space_parses_every_section():
    space = parse_space({
        "mode": "product", "num_samples": 2, "seed": 3,
        "fixed": {"train": {"epochs": 2}, "partition.sigma": 0.5},
        "search": {
            "train.k": {"grid": [2, 3]},
            "train.objective": {"choice": ["pacl", "clip"]},
            "train.temperature": {"loguniform": [0.01, 0.5]},
            "partition.sigma": {"uniform": [0.3, 0.9]},
        },
        "baselines": {"vanilla": {"train": {"objective": "clip"}}},
        "downstream": ["emotion=imagefolder:/data/e"],
        "metric": {"name": "emotion/Acc-4", "mode": "max"},
        "resources": {"workers_per_trial": 2, "use_gpu": True, "trial_cpus": 1},
        "asha": {"grace_period": 1, "reduction_factor": 3},
    }, "s.yaml")
    assert space.name == "s"
    assert space.fixed == {"train": {"epochs": 2}, "partition": {"sigma": 0.5}}
    assert space.search["train.k"] == Domain("grid", (2, 3))
    assert space.search["train.temperature"].kind == "loguniform"
    assert space.baselines == {"vanilla": {"train.objective": "clip"}}
    assert space.metric.name == "emotion/Acc-4" and space.metric.mode == "max"
    assert space.resources.workers_per_trial == 2 and space.resources.use_gpu is True
    assert space.asha.reduction_factor == 3 and (space.asha.metric, space.asha.mode) == ("val_acc", "max")


def test_metric_as_a_string_defaults_to_max():
    space = parse_space({"metric": "fi/Acc-8"})
    assert space.metric.name == "fi/Acc-8" and space.metric.mode == "max"


@pytest.mark.parametrize("data, fragment", [
    ({"serach": {}}, "serach: unknown key"),
    ({"mode": "random"}, "mode: expected one of"),
    ({"num_samples": 0}, "num_samples: expected an integer >= 1"),
    ({"search": {"partition.sigmaa": {"grid": [0.5]}}}, "search.partition.sigmaa: not a config key"),
    ({"search": {"sigma": {"grid": [0.5]}}}, "search.sigma: keys are dotted"),
    ({"search": {"partition": {"grid": [0.5]}}}, "search.partition: keys are dotted"),
    ({"search": {"train": {"grid": [1]}}}, "search.train: keys are dotted"),
    ({"search": {"partition.sigma": {"gird": [0.5]}}}, "search.partition.sigma: unknown domain 'gird'"),
    ({"search": {"partition.sigma": [0.5, 0.7]}}, "search.partition.sigma: expected exactly one of"),
    ({"search": {"partition.sigma": {"grid": []}}}, "search.partition.sigma.grid: expected a non-empty list"),
    ({"search": {"partition.sigma": {"grid": [0.5, 0.5]}}}, "search.partition.sigma.grid: repeated values"),
    ({"search": {"train.k": {"grid": [2, "three"]}}}, "search.train.k.grid[1]: train.k: expected an integer"),
    ({"search": {"partition.sigma": {"uniform": [0.9, 0.3]}}}, "search.partition.sigma.uniform: low 0.9 must be below"),
    ({"search": {"partition.sigma": {"uniform": [0.3]}}}, "search.partition.sigma.uniform: expected [low, high]"),
    ({"search": {"train.temperature": {"loguniform": [0, 0.5]}}}, "loguniform: bounds must be positive"),
    ({"search": {"train.k": {"uniform": [2, 25]}}}, "search.train.k.uniform: train.k is an integer key"),
    ({"search": {"train.objective": {"uniform": [0, 1]}}}, "train.objective is not a number key"),
    ({"search": {"train.temperature": {"grid": [0.07, 0]}}},
     "search.train.temperature.grid[1]: train.temperature=0.0 is not allowed: expected a number > 0"),
    ({"search": {"train.precision": {"choice": ["bf16", "bf61"]}}},
     "search.train.precision.choice[1]: train.precision='bf61' is not allowed: expected one of bf16, fp16, fp32"),
    ({"search": {"partition.sigma": {"uniform": [0.5, 1.5]}}},
     "search.partition.sigma.uniform[1]: partition.sigma=1.5 is not allowed: expected a number in [0, 1]"),
    ({"search": {"train.temperature": {"uniform": [-0.1, 0.5]}}},
     "search.train.temperature.uniform[0]: train.temperature=-0.1 is not allowed"),
    ({"fixed": {"partition": {"factual_calibration": "zscore"}}},
     "fixed: partition.factual_calibration='zscore' is not allowed: expected one of raw, clipscore, rank"),
    ({"baselines": {"simclr": {"train.objective": "simclr"}}},
     "baselines.simclr: train.objective='simclr' is not allowed: expected one of pacl, clip"),
    ({"fixed": {"train": {"epochz": 3}}}, "fixed: unknown config key train.epochz"),
    ({"fixed": {"train": {"epochs": "many"}}}, "fixed: train.epochs: expected an integer"),
    ({"baselines": {"vanilla": {"train.objectiv": "clip"}}}, "baselines.vanilla: unknown config key train.objectiv"),
    ({"baselines": {"vanilla": None}}, "baselines.vanilla: give at least one"),
    ({"metric": {"name": "Acc-4"}}, "metric.name: expected '<task>/<column>'"),
    ({"metric": {"name": "e/Acc-4", "mode": "up"}}, "metric.mode: expected max or min"),
    ({"metric": {"name": "e/Acc-4", "goal": "max"}}, "metric.goal: unknown key"),
    ({"resources": {"gpus": 1}}, "resources.gpus: unknown key"),
    ({"resources": {"workers_per_trial": 0}}, "resources.workers_per_trial: expected an integer >= 1"),
    ({"resources": {"trial_cpus": 0}}, "resources.trial_cpus: the trial process must reserve"),
    ({"asha": {"reduction_factor": 1}}, "asha.reduction_factor: expected a number > 1"),
    ({"downstream": [3]}, "downstream: expected a list of task specs"),
    ({"max_failures": -1}, "max_failures: expected an integer >= 0"),
])
def test_bad_spaces_are_clear_errors_naming_file_and_key(data, fragment):
    with pytest.raises(SpaceError) as info:
        parse_space(data, "spaces/bad.yaml")
    message = str(info.value)
    assert message.startswith("spaces/bad.yaml: ")
    assert fragment in message


SPACE_KEYS = ("asha, baselines, downstream, fixed, layout, max_failures, metric, mode, name, num_samples, repeats, "
              "resources, rows, search, seed, seeds")


def test_unknown_space_keys_name_close_matches_and_the_allowed_keys():
    import dataclasses

    from pacl_ray.config import TrainConfig

    train_keys = ", ".join(sorted(f.name for f in dataclasses.fields(TrainConfig)))
    expected = {
        # the top level of a space file: its own keys; a config section there belongs under fixed
        "serach": f"serach: unknown key; did you mean search? valid keys of a space file: {SPACE_KEYS}",
        "train": (f"train: unknown key; valid keys of a space file: {SPACE_KEYS}; config values go under fixed, "
                  "e.g. fixed: {train: ...}"),
        # a searched key: the config's close matches and the keys of its section, not "see config.py"
        "search.train.epoch": (f"search.train.epoch: not a config key; did you mean train.epochs? "
                               f"valid keys under train: {train_keys}"),
        "search.train.sigma": (f"search.train.sigma: not a config key; did you mean partition.sigma? "
                               f"valid keys under train: {train_keys}"),
        "fixed": (f"fixed: unknown config key train.epoch; did you mean train.epochs? valid keys under train: "
                  f"{train_keys}"),
        "metric": "metric.nam: unknown key; did you mean name? valid keys of metric: mode, name",
        "rows": "rows[0].sett: unknown key; did you mean set? valid keys of a row: labels, name, set",
    }
    spaces = {
        "serach": {"serach": {}}, "train": {"train": {"epochs": 3}},
        "search.train.epoch": {"search": {"train.epoch": {"grid": [1, 2]}}},
        "search.train.sigma": {"search": {"train.sigma": {"grid": [0.3, 0.5]}}},
        "fixed": {"fixed": {"train": {"epoch": 3}}}, "metric": {"metric": {"nam": "e/Acc-4"}},
        "rows": {"mode": "rows", "rows": [{"name": "a", "sett": {}}]},
    }
    for name, data in spaces.items():
        with pytest.raises(SpaceError) as info:
            parse_space(data, "spaces/bad.yaml")
        assert str(info.value) == f"spaces/bad.yaml: {expected[name]}", name
    with pytest.raises(SpaceError) as info:  # a wrongly typed value: the syntax that works
        parse_space({"search": {"cluster.ks": {"grid": ["2,3"]}}}, "spaces/bad.yaml")
    assert str(info.value) == ("spaces/bad.yaml: search.cluster.ks.grid[0]: cluster.ks: expected a list of integers, "
                               "got '2,3'; e.g. cluster.ks: [2, 3]")


def test_load_space_reports_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(SpaceError, match="cannot read the space file"):
        load_space(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: {partition.sigma: {grid: [0.5, }\n")
    with pytest.raises(SpaceError, match="bad.yaml: not valid YAML"):
        load_space(str(bad))
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(SpaceError, match="list.yaml: the top level must be a mapping"):
        load_space(str(top))


def test_one_at_a_time_shares_the_adopted_trial():
    space = parse_space({
        "fixed": {"partition": {"sigma": 0.7}, "train": {"k": 2}},
        "search": {"partition.sigma": {"grid": [0.3, 0.7, 1]}, "train.k": {"grid": [2, 6]}},
        "baselines": {"vanilla": {"train.objective": "clip"}},
    })
    trials = expand_trials(space, base_of(space))
    assert [t.name for t in trials] == [
        "adopted", "partition.sigma=0.3", "partition.sigma=1", "train.k=6", "baseline:vanilla"]
    assert trials[0].overrides == {}
    assert trials[2].varied == {"partition.sigma": 1}
    assert trials[-1].overrides == {"train.objective": "clip"} and trials[-1].baseline == "vanilla"


def test_adopted_value_matches_numerically_equal_grid_values():
    # 1 and 1.0, and 0.7 from YAML vs the config default 0.7, are the same trial.
    space = parse_space({"fixed": {"partition": {"sigma": 1}}, "search": {"partition.sigma": {"grid": [0.5, 1.0]}}})
    assert [t.name for t in expand_trials(space, base_of(space))] == ["adopted", "partition.sigma=0.5"]


def test_product_mode_is_grid_product_times_samples():
    space = parse_space({
        "mode": "product", "num_samples": 3, "seed": 7,
        "search": {"train.k": {"grid": [2, 3]}, "partition.sigma": {"grid": [0.5, 0.7]},
                   "train.temperature": {"loguniform": [0.01, 0.5]}},
    })
    trials = expand_trials(space, base_of(space))
    assert len(trials) == 3 * 2 * 2
    assert len({t.name for t in trials}) == len(trials)
    combos = {(t.varied["train.k"], t.varied["partition.sigma"]) for t in trials}
    assert combos == {(2, 0.5), (2, 0.7), (3, 0.5), (3, 0.7)}
    taus = [t.varied["train.temperature"] for t in trials]
    assert all(0.01 <= tau <= 0.5 for tau in taus)
    assert len(set(taus)) == len(taus)
    # Deterministic from the seed: a relaunched sweep expands to the very same trials.
    assert expand_trials(space, base_of(space)) == trials


def test_random_domains_sample_within_bounds_and_by_seed():
    space = parse_space({
        "num_samples": 200, "seed": 1,
        "search": {"partition.sigma": {"uniform": [0.2, 0.4]},
                   "train.temperature": {"loguniform": [0.01, 1.0]},
                   "train.objective": {"choice": ["pacl", "clip"]}},
    })
    trials = expand_trials(space, base_of(space))
    sigmas = [t.varied["partition.sigma"] for t in trials if "partition.sigma" in t.varied]
    taus = [t.varied["train.temperature"] for t in trials if "train.temperature" in t.varied]
    objectives = [t.varied["train.objective"] for t in trials if "train.objective" in t.varied]
    assert len(sigmas) == 200 and all(0.2 <= s <= 0.4 for s in sigmas)
    assert all(0.01 <= t <= 1.0 for t in taus)
    # loguniform: about half the draws fall below the geometric mean 0.1
    assert 0.35 < sum(t < 0.1 for t in taus) / len(taus) < 0.65
    # choice draws equal to the adopted value (pacl) are the shared adopted trial
    assert set(objectives) == {"clip"}
    other_seed = parse_space({"num_samples": 5, "seed": 2, "search": {"partition.sigma": {"uniform": [0.2, 0.4]}}})
    assert [t.varied["partition.sigma"] for t in expand_trials(other_seed, base_of(other_seed))[1:]] != sigmas[:5]


def test_trial_round_trips_and_applies_overrides():
    trial = Trial("baseline:vanilla", {"partition.sigma": 0.3}, "vanilla", {"train.objective": "clip"})
    assert Trial.from_dict(trial.to_dict()) == trial
    base = config.to_dict(config.RunConfig())
    data = apply_dotted(base, trial.overrides)
    assert data["partition"]["sigma"] == 0.3 and data["train"]["objective"] == "clip"
    assert base["partition"]["sigma"] == 0.7  # the base is not modified


def test_log_scale_for_wide_positive_grids():
    assert Domain("grid", (0.01, 0.03, 0.05, 0.07, 0.5)).log_scale
    assert not Domain("grid", (2, 3, 6, 10, 15, 25)).log_scale
    assert not Domain("grid", (0, 0.3, 0.5, 0.7, 0.9, 1)).log_scale
    assert Domain("loguniform", (), 0.01, 0.5).log_scale


@pytest.mark.parametrize("name, keys", [
    ("table5_sigma", ["partition.sigma"]),
    ("table5_k", ["train.k"]),
    ("table5_tau", ["train.temperature"]),
    ("table5", ["partition.sigma", "train.k", "train.temperature"]),
])
def test_shipped_table5_spaces_are_the_papers_grids(name, keys):
    space = load_space(str(REPO / "tune_spaces" / f"{name}.yaml"))
    assert space.mode == "one_at_a_time"
    assert list(space.search) == keys
    base = config.to_dict(config.from_dict(space.fixed))
    for key in PAPER_GRIDS:
        section, leaf = key.split(".")
        assert base[section][leaf] == ADOPTED[key]  # the others at the adopted values
    for key in keys:
        assert space.search[key].kind == "grid"
        assert list(space.search[key].values) == PAPER_GRIDS[key]
    trials = expand_trials(space, base)
    searched = [t for t in trials if not t.baseline]
    # the adopted trial is shared: one trial per grid value, minus the adopted duplicates
    assert len(searched) == 1 + sum(len(PAPER_GRIDS[k]) - 1 for k in keys)


def test_default_space_is_small_and_has_the_vanilla_baseline():
    space = load_space(str(REPO / "tune_spaces" / "default.yaml"))
    trials = expand_trials(space, config.to_dict(config.from_dict(space.fixed)))
    assert 2 <= len(trials) <= 5
    assert any(t.baseline and t.overrides.get("train.objective") == "clip" for t in trials)
    assert space.metric is not None


def test_every_shipped_space_is_valid_yaml_with_comments():
    for path in sorted((REPO / "tune_spaces").glob("*.yaml")):
        text = path.read_text()
        assert text.lstrip().startswith("#"), f"{path.name} should explain itself in a header comment"
        load_space(str(path))
        assert isinstance(yaml.safe_load(text), dict)


# --------------------------------------------------------------------------- rows: paper Table 4

# Paper Table 4, in its order: (Partition, Sample usage) -> the configuration that is that row
# (SPEC "Choice (sample usage, Table 4)").
TABLE4_ROWS = [
    ("None", "All", {"train.objective": "clip", "partition.use_scores": "both", "train.partitions": [1, 2, 3, 4]}),
    ("Factual", "Factual-matched", {"train.objective": "pacl", "partition.use_scores": "factual", "train.partitions": [1]}),
    ("Factual", "Factual-matched + Factual-mismatched",
     {"train.objective": "pacl", "partition.use_scores": "factual", "train.partitions": [1, 2]}),
    ("Emotional", "Emotional-matched",
     {"train.objective": "pacl", "partition.use_scores": "emotional", "train.partitions": [1]}),
    ("Emotional", "Emotional-matched + Emotional-mismatched",
     {"train.objective": "pacl", "partition.use_scores": "emotional", "train.partitions": [1, 3]}),
    ("Both", "Strong-coupled", {"train.objective": "pacl", "partition.use_scores": "both", "train.partitions": [1]}),
    ("Both", "Strong-coupled + Partial-coupled",
     {"train.objective": "pacl", "partition.use_scores": "both", "train.partitions": [1, 2, 3]}),
    ("Both", "Strong-coupled + Partial-coupled + Weak-coupled",
     {"train.objective": "pacl", "partition.use_scores": "both", "train.partitions": [1, 2, 3, 4]}),
]


def test_table4_space_expands_to_exactly_the_papers_eight_rows():
    space = load_space(str(REPO / "tune_spaces" / "table4.yaml"))
    assert space.mode == "rows" and not space.search and not space.baselines
    base = base_of(space)
    trials = expand_trials(space, base)
    assert len(trials) == len(space.rows) == 8
    for trial, row, (partition, usage, overrides) in zip(trials, space.rows, TABLE4_ROWS):
        assert row.labels == {"partition": partition, "sample usage": usage}
        assert trial.name == row.name == f"{partition}: {usage}"
        assert trial.overrides == overrides and not trial.baseline
        cfg = config.from_dict(apply_dotted(base, trial.overrides))
        assert (cfg.partition.sigma, cfg.train.k, cfg.train.temperature) == (0.7, 2, 0.07)  # adopted values
    # the last row is PACL as configured by default; the first is vanilla contrastive learning
    assert config.from_dict(apply_dotted(base, trials[-1].overrides)) == config.from_dict(base)
    # eight distinct configurations
    assert len({yaml.safe_dump(apply_dotted(base, t.overrides)) for t in trials}) == 8


def test_rows_mode_parses_names_labels_and_overrides():
    space = parse_space({"mode": "rows", "rows": [
        {"name": "a", "set": {"train": {"partitions": [1]}}},
        {"name": "b", "labels": {"x": "y"}, "set": {}},
    ], "baselines": {"vanilla": {"train.objective": "clip"}}}, "r.yaml")
    trials = expand_trials(space, base_of(space))
    assert [t.name for t in trials] == ["a", "b", "baseline:vanilla"]
    assert trials[0].overrides == {"train.partitions": [1]} and trials[1].overrides == {}
    assert space.rows[1].labels == {"x": "y"}


@pytest.mark.parametrize("data, fragment", [
    ({"rows": [{"name": "a", "set": {}}]}, "rows: only allowed with mode: rows"),
    ({"mode": "rows"}, "rows: expected a non-empty list"),
    ({"mode": "rows", "rows": [{"name": "a"}], "search": {"train.k": {"grid": [2]}}}, "search: not allowed with mode: rows"),
    ({"mode": "rows", "rows": [{"name": "a"}, {"name": "a"}]}, "rows[1].name: 'a' is used by an earlier row"),
    ({"mode": "rows", "rows": [{"set": {}}]}, "rows[0].name: expected a non-empty string"),
    ({"mode": "rows", "rows": [{"name": "a", "sett": {}}]}, "rows[0].sett: unknown key"),
    ({"mode": "rows", "rows": [{"name": "a", "set": {"train.partitions": [5]}}]},
     "rows[0].set: train.partitions[0]=5 is not allowed: expected one of 1, 2, 3, 4"),
    ({"mode": "rows", "rows": [{"name": "a", "labels": ["x"]}]}, "rows[0].labels: expected a mapping"),
])
def test_bad_rows_are_clear_errors(data, fragment):
    with pytest.raises(SpaceError) as info:
        parse_space(data, "spaces/bad.yaml")
    assert str(info.value).startswith("spaces/bad.yaml: ") and fragment in str(info.value)


# --------------------------------------------------------------------------- ASHA


@pytest.mark.parametrize("metric, why", [
    ("total", "is a training-loss signal"), ("L_s", "is a training-loss signal"), ("loss", "is a training-loss signal"),
    ("L3", "is a training-loss signal"), ("lr_backbone", "is a training-loss signal"),
    ("emotion/Acc", "is a downstream metric, which exists only once a trial has finished"),
    ("val/knn_acc", "is a downstream metric"), ("accuracy", "is not a metric the training stage reports"),
])
def test_asha_on_anything_but_the_validation_probe_is_refused(metric, why):
    with pytest.raises(SpaceError, match=r"asha.yaml: asha.metric: .*" + why + r".*allowed: val_acc \(mode max\).*"
                                         r"validation.every_epochs.*or remove `asha:`"):
        parse_space({"asha": {"metric": metric}}, "asha.yaml")
    with pytest.raises(SpaceError, match="asha.mode: val_acc is an accuracy, higher is better: mode max"):
        parse_space({"asha": {"metric": "val_acc", "mode": "min"}}, "asha.yaml")


def test_asha_metric_is_what_training_reports():
    from pacl_ray.stages.validation import VAL_METRIC, VAL_MODE

    assert ASHA_METRICS == {VAL_METRIC: VAL_MODE}


def _base(**sections) -> dict:
    return config.to_dict(config.from_dict(sections))


def test_asha_needs_the_validation_probe_on_with_a_task():
    space = parse_space({"asha": {"grace_period": 2}}, "asha.yaml")
    assert (space.asha.metric, space.asha.mode) == ("val_acc", "max")  # the default
    check_asha(space)  # the metric alone
    check_asha(parse_space({}, "none.yaml"), _base())  # no ASHA: nothing to check
    with pytest.raises(SpaceError, match=r"asha.yaml: asha: ASHA ranks trials on val_acc.*which is off "
                                         r"\(validation.every_epochs=0\): set validation.every_epochs .*validation.task"):
        check_asha(space, _base())
    with pytest.raises(SpaceError, match=r"asha.grace_period: 2 epoch\(s\) is before the first validation probe "
                                         r"\(validation.every_epochs=3\)"):
        check_asha(space, _base(validation={"every_epochs": 3}, evaluate={"tasks": ["imagefolder:e=/x"]}))
    with pytest.raises(SpaceError, match=r"the validation probe needs a labelled task: set validation.task=.*evaluate.tasks"):
        check_asha(space, _base(validation={"every_epochs": 1}))
    check_asha(space, _base(validation={"every_epochs": 1}), tasks_known=False)  # the world will supply it
    check_asha(space, _base(validation={"every_epochs": 2}, evaluate={"tasks": ["imagefolder:e=/x"]}))
    check_asha(space, _base(validation={"every_epochs": 1, "task": "single:fi=/data/FI"}))


def _with_tasks(*tasks: str, protocol: str = "linear") -> dict:
    return {"evaluate": {"tasks": list(tasks), "protocol": protocol, "prompts": ["a {} photo"]}}


@pytest.mark.parametrize("name", ["emotion/Acc", "emotion/Acc-4", "emotion/F1", "emotion/F1-4",
                                  "FI/Acc-8", "emotion-finetune/Acc", "emo_v/MSE", "emo_v/R2", "tags/mAP",
                                  "emotion-zeroshot/Acc", "emotion-zeroshot[a {} photo]/F1-4"])
def test_metric_naming_a_result_column_passes(name):
    base = _with_tasks("imagefolder:emotion=/d", "single:fi=/d/FI", "vad:iaps=/d,name=emo_v",
                       "multilabel:emotic=/d,name=tags", protocol="linear,finetune,zeroshot")
    check_metric(parse_space({"metric": name}, path="s.yaml"), base)


@pytest.mark.parametrize("name, why", [
    ("emotion/Acc2", "column"), ("emotion/Acc-", "column"), ("emotion/mAP", "kind"), ("emotoin/Acc", "task"),
    ("emotion-finetune/Acc", "protocol not run"), ("emo_v/Acc", "kind"),
])
def test_metric_that_is_no_result_column_is_refused_at_plan_time(name, why):
    base = _with_tasks("imagefolder:emotion=/d", "vad:iaps=/d,name=emo_v")
    with pytest.raises(SpaceError) as info:
        check_metric(parse_space({"metric": name}, path="spaces/typo.yaml"), base)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("spaces/typo.yaml: metric.name: ")
    assert repr(name) in message
    assert "valid: emotion/Acc-C, emotion/F1-C, emo_v/MSE, emo_v/R2" in message


def test_metric_names_the_task_by_its_display_name_as_the_result_columns_do():
    with pytest.raises(SpaceError, match=r"'fi/Acc-8' is not a result column.*valid: FI/Acc-C, FI/F1-C"):
        check_metric(parse_space({"metric": "fi/Acc-8"}), _with_tasks("single:fi=/d/FI"))
    check_metric(parse_space({"metric": "FI/Acc-8"}), _with_tasks("single:fi=/d/FI"))


def test_metric_check_waits_for_the_tasks_and_skips_spaces_without_a_metric():
    check_metric(parse_space({"metric": "emotion/Acc2"}), {"evaluate": {"tasks": []}})  # world not built yet
    check_metric(parse_space({}), _with_tasks("imagefolder:emotion=/d"))


def test_result_columns_follow_the_driver_naming():
    from pacl_ray.sweeps.driver import flatten_rows

    columns = result_columns(_with_tasks("imagefolder:emotion=/d", protocol="linear,finetune"))
    assert columns == {"emotion": ("Acc", "F1"), "emotion-finetune": ("Acc", "F1")}
    rows = [{"dataset": "emotion", "protocol": p, "Acc-4": 1.0, "F1-4": 2.0} for p in ("linear", "finetune")]
    space_names = [f"{t}/{c}" for t, cols in columns.items() for c in cols]
    flat = flatten_rows(rows)
    for name in space_names:  # every name the check accepts prefix-matches a flattened column
        assert any(col == name or col.startswith(f"{name}-") for col in flat), (name, flat)


def test_tune_refuses_a_typo_metric_before_ray_starts(tmp_path, monkeypatch):
    """`pacl-ray tune` with data and downstream tasks of one's own checks the metric first."""
    from pacl_ray.stages import runtime
    from pacl_ray.sweeps import driver

    monkeypatch.setattr(runtime, "init_ray", lambda *_: pytest.fail("Ray started"))
    space = tmp_path / "typo.yaml"
    space.write_text(yaml.safe_dump({"search": {"partition.sigma": {"grid": [0.3]}},
                                     "metric": {"name": "emotion/Acc2"}}))
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("")
    with pytest.raises(SpaceError, match=r"typo.yaml: metric.name: 'emotion/Acc2' is not a result column of the "
                                         r"downstream tasks; valid: emotion/Acc-C, emotion/F1-C"):
        driver.run_tune(str(space), data=str(manifest), downstream=[f"imagefolder:emotion={tmp_path}"],
                        output_dir=str(tmp_path / "runs"))
