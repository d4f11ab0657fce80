"""pacl_ray.stages.pipeline: each stage is resolved once per run and its output handed forward;
a sweep's driver resolves the shared stages once and its trials resolve none of them again."""

from __future__ import annotations

from collections import Counter

import pytest

from pacl_ray import config as config_mod
from pacl_ray.config import RunConfig
from pacl_ray.stages import embed, ingest, partition, pipeline, pseudo_labels, scoring, train
from pacl_ray.stages.cache import StageOutput


@pytest.fixture()
def resolutions(monkeypatch) -> Counter:
    """Replace every stage's run function with one that counts its calls and checks its inputs."""
    calls: Counter = Counter()

    def fake(stage: str, upstream: str | None):
        def run(cfg, *args, **kwargs):
            calls[stage] += 1
            if upstream is not None:
                assert args[0].stage == upstream  # the upstream output was handed forward
            return StageOutput(stage, f"{stage}-key", f"/nowhere/{stage}", cached=True)

        return run

    monkeypatch.setattr(ingest, "run_ingest", fake("ingest", None))
    monkeypatch.setattr(scoring, "run_scoring", fake("scores", "ingest"))
    monkeypatch.setattr(partition, "run_partition", fake("partition", "scores"))
    monkeypatch.setattr(embed, "run_embed", fake("embed", "ingest"))
    monkeypatch.setattr(pseudo_labels, "run_cluster", fake("cluster", "embed"))

    def run_train(cfg, *, ingest, partition, embed, cluster, callbacks=None, validation=None, **launch):
        calls["train"] += 1
        assert (ingest.stage, partition.stage, embed.stage, cluster.stage) == ("ingest", "partition", "embed", "cluster")
        return "trained"

    monkeypatch.setattr(train, "run_train", run_train)
    return calls


def test_train_resolves_every_upstream_stage_once(resolutions):
    assert pipeline.stage_train(RunConfig()) == "trained"
    assert resolutions == {"ingest": 1, "scores": 1, "partition": 1, "embed": 1, "cluster": 1, "train": 1}


def test_given_upstream_outputs_are_not_resolved_again(resolutions):
    pipe = pipeline.Pipeline(RunConfig())
    upstream = pipe.upstream_of_train()
    resolutions.clear()
    assert pipeline.stage_train(RunConfig(), upstream=upstream) == "trained"
    assert resolutions == {"train": 1}


def test_sweep_driver_resolves_ingest_once_and_trials_reuse_its_outputs(resolutions, monkeypatch, tmp_path):
    from pacl_ray.sweeps import driver

    base = config_mod.to_dict(RunConfig(output_dir=str(tmp_path)))
    trial_configs = {}
    for name, sigma in (("a", 0.5), ("b", 0.7)):
        data = config_mod.to_dict(config_mod.from_dict(base))
        data["partition"]["sigma"] = sigma
        trial_configs[name] = data
    upstream = driver.prepare_upstream(trial_configs, log=lambda _: None)
    assert resolutions["ingest"] == 1  # one ingest for the whole sweep
    assert set(upstream) == {"a", "b"} and set(upstream["a"]) == {"ingest", "partition", "embed", "cluster"}

    resolutions.clear()
    import ray.tune

    reports = []
    monkeypatch.setattr(ray.tune, "report", reports.append)
    monkeypatch.setattr(driver, "evaluate_rows", lambda *args, **kwargs: [])

    class Result:
        backbone_checkpoint, uri, cached, final_metrics = "ckpt", "/nowhere/train", True, {}

    real_stage_train = pipeline.stage_train

    def stage_train(cfg, callbacks=None, upstream=None, validation=None, **launch):
        assert validation is None  # validation.every_epochs is 0 by default
        assert launch["in_process"] is True  # a sweep trial asks for the in-process launch
        real_stage_train(cfg, callbacks=callbacks, upstream=upstream, validation=validation, **launch)
        return Result()

    monkeypatch.setattr(pipeline, "stage_train", stage_train)
    trainable = driver.make_trainable(trial_configs, str(tmp_path / "sweep"), str(tmp_path), False, upstream=upstream)
    for name in trial_configs:
        trainable({"trial": name})
    assert resolutions == {"train": 2}  # the trials resolved no upstream stage
    assert [r["trial"] for r in reports] == ["a", "b"]
