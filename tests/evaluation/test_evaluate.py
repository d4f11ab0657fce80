"""Downstream evaluation end to end on tiny models and generated images: linear evaluation and
zero-shot from an export (Ray Data features, the row cache, the merged table) and the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import TINY_TIMM
from pacl_ray.evaluation import evaluate, features
from pacl_ray.evaluation.resolve import resolve_backbone
from pacl_ray.evaluation.tasks import load_task, parse_task
from pacl_ray.evaluation.zeroshot import class_prompts, zero_shot_scores
from pacl_ray.formats.export import ExportError, load_export
from toy_world import cfg_for, one_torch_thread, world  # noqa: F401 (fixtures)


def test_linear_and_zeroshot_end_to_end(ray_local, world, monkeypatch):
    cfg = cfg_for(world)
    out_dir = os.path.join(world["output"], "table")
    task = f"imagefolder:toy={world['root']}"
    rows = evaluate.evaluate_backbone(cfg, world["export"], "", [task], out_dir, protocol="linear,zeroshot")
    linear = [r for r in rows if r["protocol"] == "linear"]
    zeroshot = [r for r in rows if r["protocol"] == "zeroshot"]
    assert len(linear) == 1 and linear[0]["Acc-2"] >= 80.0  # colour is linearly readable
    assert [r["prompt"] for r in zeroshot] == list(cfg.evaluate.prompts) + ["ensemble"]
    assert all(0 <= r["Acc-2"] <= 100 for r in zeroshot)
    assert linear[0]["quarantined"] == 1 and linear[0]["n_train"] == 16
    for name in ("results.md", "results.csv", "rows.json", "config.yaml"):
        assert os.path.isfile(os.path.join(out_dir, name))
    quarantine = os.listdir(os.path.join(out_dir, "quarantine"))
    assert len(quarantine) == 1
    with open(os.path.join(out_dir, "quarantine", quarantine[0])) as handle:
        assert json.load(handle)[0]["reason"] == "corrupt_image"

    # zero-shot equals the cosine argmax computed by hand from the cached features
    export = load_export(world["export"])
    data = load_task(parse_task(task))
    ref = resolve_backbone(cfg, world["export"])
    monkeypatch.setattr(features, "run_udfs_on_table", _fail_if_called)  # the features are cached
    image_features = torch.as_tensor(features.extract_features(cfg, ref, data, ("test",))["test"])
    from pacl_ray.core.backbones import TextEncoder

    encoder = TextEncoder(export.meta["text_encoder"], "mean", 32)
    texts = encoder.encode(class_prompts(cfg.evaluate.prompts[0], ["happy", "sad"])) @ export.text_proj.T
    scores = zero_shot_scores(image_features, torch.nn.functional.normalize(texts, dim=-1), export.image_proj)
    accuracy = 100 * (scores.argmax(1).numpy() == data.splits["test"].targets).mean()
    assert zeroshot[0]["Acc-2"] == pytest.approx(accuracy)

    # a second call is answered from the row cache and merged into the same table
    again = evaluate.evaluate_backbone(cfg, world["export"], "", [task], out_dir, label="again", protocol="linear")
    assert again[0]["Acc-2"] == linear[0]["Acc-2"]
    with open(os.path.join(out_dir, "results.md")) as handle:
        table = handle.read()
    assert "| again | Linear Evaluation |" in table and f"| {TINY_TIMM} + PACL | Zero-shot |" in table


def _fail_if_called(*args, **kwargs):
    raise AssertionError("features should have come from the cache")


def test_zeroshot_needs_an_export(world):
    with pytest.raises(ExportError, match="needs a PACL export"):
        evaluate.evaluate_backbone(cfg_for(world), TINY_TIMM, "", [f"imagefolder:toy={world['root']}"],
                                   os.path.join(world["output"], "x"), protocol="zeroshot")


def test_cli_evaluate_writes_table(ray_local, world, capsys):
    from pacl_ray import cli

    argv = ["evaluate", "--backbone", world["export"], "--task", f"imagefolder:toy={world['root']}",
            "--output-dir", world["output"], "--set", "evaluate.linear_epochs=15", "--set", "evaluate.batch_size=16",
            "--set", "evaluate.compare_initial=false", "--set", f"model.backbone={TINY_TIMM}"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"| {TINY_TIMM} + PACL | Linear Evaluation |" in out
    directory = out.strip().splitlines()[-1].split("evaluate: ", 1)[1]
    assert os.path.isfile(os.path.join(directory, "_SUCCESS"))
    assert cli.main(argv) == 0 and "(cached)" in capsys.readouterr().out
    assert cli.main(["evaluate", "--task", "single:nope=/x", "--output-dir", world["output"]]) == 2
    assert "no single reader for 'nope'" in capsys.readouterr().err
