"""Downstream evaluation: task specs, the linear probe on planted signals, the results table,
and end-to-end runs (Ray Data linear evaluation, zero-shot from an export, fine-tuning, the CLI)
on tiny models and generated images."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_TIMM
from pacl_ray import config as config_mod
from pacl_ray.evaluation import evaluate
from pacl_ray.evaluation.evaluate import ExportError, TaskSpecError


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core CI box the thread
    pool's synchronisation makes each step ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------- task specs


def test_parse_task_forms():
    spec = evaluate.parse_task("single:fi=/data/FI", default_seed=7)
    assert (spec.kind, spec.dataset, spec.root, spec.seed, spec.limit) == ("single", "fi", "/data/FI", 7, 0)
    assert spec.display == "FI" and spec.task_kind == "single"
    spec = evaluate.parse_task("imagefolder:emo=/path/with,comma/root,limit=20,seed=3,name=My Emo")
    assert (spec.root, spec.limit, spec.seed, spec.display) == ("/path/with,comma/root", 20, 3, "My Emo")
    assert spec.task_kind == "single"
    assert evaluate.parse_task("vad:iaps=s3://bucket/IAPS").root == "s3://bucket/IAPS"
    assert evaluate.parse_task("hierarchical:webemo=/w").display == "WebEmo"


@pytest.mark.parametrize(
    "text, message",
    [
        ("single:fi", "expected KIND:DATASET=ROOT"),
        ("fi=/data", "expected KIND:DATASET=ROOT"),
        ("single:fi=", "expected KIND:DATASET=ROOT"),
        ("regression:fi=/x", "unknown kind 'regression'"),
        ("single:webemo=/x", "no single reader for 'webemo'.*imagefolder:webemo"),
        ("multilabel:fi=/x", "multilabel datasets: emotic"),
        ("single:fi=/x,limit=many", "integers"),
        ("single:fi=/x,colour=red", "unknown option 'colour'"),
        ("imagefolder:=/x", "empty dataset name"),
    ],
)
def test_parse_task_errors(text, message):
    with pytest.raises(TaskSpecError, match=message):
        evaluate.parse_task(text)


def test_parse_protocols():
    assert evaluate.parse_protocols("linear") == ["linear"]
    assert evaluate.parse_protocols("linear, zeroshot") == ["linear", "zeroshot"]
    with pytest.raises(TaskSpecError, match="expected one or more"):
        evaluate.parse_protocols("probe")


# --------------------------------------------------------------------------- linear probe on planted signals


def _planted(kind: str, n: int = 600, dim: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32) * 3 + 1  # not standardised: the probe must cope
    w = rng.normal(size=(dim, 4))
    if kind == "single":
        y = np.argmax((x - 1) @ w, axis=1)
    elif kind == "hierarchical":
        fine = np.argmax((x - 1) @ w, axis=1)
        y = np.stack([fine // 2, fine], axis=1)  # level 1 = pairs of fine classes
    elif kind == "multilabel":
        y = ((x - 1) @ w > 0).astype(np.float32)
    else:
        y = ((x - 1) @ w[:, :3] / 10 + 0.5).astype(np.float32)
    return x, y


def _probe(kind, x, y, out_dims, epochs=40):
    probe = evaluate.train_linear_probe(x[:400], y[:400], x[400:500], y[400:500], kind, out_dims, epochs=epochs)
    return probe, probe.predict(x[500:]), y[500:]


def test_linear_probe_recovers_planted_single_label_signal():
    x, y = _planted("single")
    probe, pred, truth = _probe("single", x, y, [4])
    assert (pred == truth).mean() > 0.9
    assert 0 <= probe.best_epoch < 40 and len(probe.history) == 40


def test_linear_probe_is_near_chance_on_shuffled_labels():
    x, y = _planted("single")
    shuffled = np.random.default_rng(1).permutation(y)
    _, pred, truth = _probe("single", x, shuffled, [4])
    assert (pred == truth).mean() < 0.45  # chance is about 0.25


def test_linear_probe_hierarchical_multilabel_and_vad():
    x, y = _planted("hierarchical")
    _, pred, truth = _probe("hierarchical", x, y, [2, 4])
    assert pred.shape == truth.shape and (pred == truth).mean(axis=0).min() > 0.8  # chance: 0.5, 0.25
    x, y = _planted("multilabel")
    _, scores, truth = _probe("multilabel", x, y, [4], epochs=20)
    assert evaluate.metrics.multilabel_metrics(truth, scores)["AUC"] > 95
    x, y = _planted("vad")
    _, values, truth = _probe("vad", x, y, [3], epochs=20)
    assert evaluate.metrics.vad_metrics(truth, values)["R2"] > 0.9


# --------------------------------------------------------------------------- zero-shot pieces


def test_class_prompts_and_names():
    assert evaluate.class_prompts("A photo with {} emotion.", ["Doubt/Confusion", "awe"]) == [
        "A photo with doubt or confusion emotion.", "A photo with awe emotion."]
    assert evaluate.class_prompts("The photo makes me feel so [C]!", ["sad"]) == ["The photo makes me feel so sad!"]
    with pytest.raises(TaskSpecError, match="exactly one"):
        evaluate.class_prompts("no slot", ["a"])


def test_zero_shot_scores_are_cosines_of_projected_features():
    image_proj = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # E=2, Dv=3
    images = torch.tensor([[2.0, 0.0, 5.0], [0.0, -3.0, 1.0]])
    texts = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]]), dim=-1)
    scores = evaluate.zero_shot_scores(images, texts, image_proj)
    expected = torch.tensor([[1.0, 2 ** -0.5, 0.0], [0.0, -(2 ** -0.5), 1.0]])
    torch.testing.assert_close(scores, expected)


# --------------------------------------------------------------------------- results table


def _rows():
    base = {"task": "single:fi=/d", "dataset": "FI", "prompt": ""}
    return [
        {**base, "model": "resnet50", "protocol": "linear", "Acc-8": 57.72, "F1-8": 56.72},
        {**base, "model": "resnet50 + PACL", "protocol": "linear", "Acc-8": 59.5, "F1-8": 59.03},
        {"task": "vad:iaps=/i", "dataset": "IAPS", "prompt": "", "model": "resnet50", "protocol": "linear",
         "MSE": 2.13, "R2": 0.279},
        {"task": "vad:iaps=/i", "dataset": "IAPS", "prompt": "", "model": "resnet50 + PACL",
         "protocol": "linear", "MSE": 1.982, "R2": 0.31},
        {**base, "model": "resnet50", "protocol": "finetune", "Acc-8": 65.14, "F1-8": 64.84},
    ]


def test_results_table_layout():
    markdown, table = evaluate.results_table(_rows())
    lines = markdown.strip().splitlines()
    assert lines[0] == "| Model | Protocol | FI Acc-8 | FI F1-8 | IAPS MSE | IAPS R2 |"
    assert lines[2] == "| resnet50 | Linear Evaluation | 57.72 | 56.72 | 2.130 | 0.2790 |"
    # best per column within a protocol is bold; lower MSE is better
    assert lines[3] == "| resnet50 + PACL | Linear Evaluation | **59.50** | **59.03** | **1.982** | **0.3100** |"
    assert lines[4] == "| resnet50 | Fine-tuning | 65.14 | 64.84 | - | - |"
    parsed = list(csv.reader(io.StringIO(table)))
    assert parsed[0] == ["Model", "Protocol", "FI Acc-8", "FI F1-8", "IAPS MSE", "IAPS R2"]
    assert float(parsed[2][2]) == 59.5 and parsed[3][4] == ""


def test_results_table_prompt_column_and_colliding_datasets():
    rows = [
        {"task": "vad:emotic=/a", "dataset": "Emotic", "model": "m", "protocol": "linear", "MSE": 1.0, "R2": 0.1},
        {"task": "vad:emotic=/b", "dataset": "Emotic", "model": "m", "protocol": "linear", "MSE": 2.0, "R2": 0.2},
        {"task": "single:fi=/d", "dataset": "FI", "model": "m", "protocol": "zeroshot", "prompt": "p {}",
         "Acc-8": 30.0, "F1-8": 20.0},
    ]
    markdown, _ = evaluate.results_table(rows)
    header = markdown.splitlines()[0]
    assert "| Prompt |" in header and "Emotic MSE" in header and "vad:emotic=/b MSE" in header


# --------------------------------------------------------------------------- end to end on tiny models


def _toy_images(root, n_train=8, n_eval=3):
    """Two visually distinct classes in the pre-split ImageFolder layout, plus one corrupt file."""
    rng = np.random.default_rng(0)
    colours = {"happy": (250, 210, 20), "sad": (20, 30, 110)}
    for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        for name, colour in colours.items():
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.integers(-25, 25, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i}.png"))
    with open(os.path.join(root, "train", "sad", "broken.jpg"), "wb") as handle:
        handle.write(b"\xff\xd8not really a jpeg")
    return root


def _export(directory, minilm_path, embed_dim=16):
    """A PACL export made by hand: test_resnet weights + random heads + MiniLM as the text encoder."""
    from safetensors.torch import save_file

    from pacl_ray.core.backbones import create_backbone

    torch.manual_seed(0)
    backbone = create_backbone(TINY_TIMM, "false")
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()},
              os.path.join(directory, "backbone.safetensors"))
    save_file({"image_proj.weight": torch.randn(embed_dim, backbone.num_features),
               "text_proj.weight": torch.randn(embed_dim, 384)}, os.path.join(directory, "heads.safetensors"))
    meta = {"backbone": TINY_TIMM, "text_encoder": minilm_path, "text_pooling": "mean",
            "text_max_length": 32, "embed_dim": embed_dim, "backbone_pretrained": "false"}
    with open(os.path.join(directory, "export.json"), "w") as handle:
        json.dump(meta, handle)
    return directory


@pytest.fixture(scope="module")
def world(tmp_path_factory, minilm_path):
    base = tmp_path_factory.mktemp("evaluate")
    root = _toy_images(str(base / "toy"))
    export = _export(str(base / "export"), minilm_path)
    return {"root": root, "export": export, "output": str(base / "runs")}


def _cfg(world, **evaluate_fields) -> config_mod.RunConfig:
    cfg = config_mod.from_dict({"output_dir": world["output"], "model": {"backbone": TINY_TIMM},
                                "evaluate": {"linear_epochs": 15, "batch_size": 16, **evaluate_fields}})
    return cfg


def test_resolve_backbone_forms(world, tmp_path):
    cfg = _cfg(world)
    ref = evaluate.resolve_backbone(cfg, world["export"])
    assert ref.export_dir and ref.name == TINY_TIMM and ref.label == f"{TINY_TIMM} + PACL"
    assert ref.checkpoint.endswith("backbone.safetensors")
    assert evaluate.initial_ref(cfg, ref).pretrained == "false"
    plain = evaluate.resolve_backbone(cfg, "resnet18")
    assert (plain.name, plain.pretrained, plain.checkpoint, plain.export_dir) == ("resnet18", "true", "", "")
    weights = evaluate.resolve_backbone(cfg, os.path.join(world["export"], "backbone.safetensors"))
    assert weights.name == TINY_TIMM and weights.checkpoint and not weights.export_dir
    via_checkpoint = evaluate.resolve_backbone(cfg, TINY_TIMM, os.path.join(world["export"], "backbone.safetensors"))
    assert via_checkpoint.export_dir == world["export"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="neither a PACL export"):
        evaluate.resolve_backbone(cfg, str(tmp_path / "empty"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "export.json").write_text(json.dumps({"backbone": TINY_TIMM}))
    with pytest.raises(ExportError, match="missing key 'text_encoder'"):
        evaluate.resolve_backbone(cfg, str(tmp_path / "half"))


def test_linear_and_zeroshot_end_to_end(ray_local, world, monkeypatch):
    cfg = _cfg(world)
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
    export = evaluate.load_export(world["export"])
    data = evaluate.load_task(evaluate.parse_task(task))
    ref = evaluate.resolve_backbone(cfg, world["export"])
    monkeypatch.setattr(evaluate, "_features_in_process", _fail_if_called)  # the features are cached
    monkeypatch.setattr(evaluate, "_features_on_ray_data", _fail_if_called)
    features = torch.as_tensor(evaluate.extract_features(cfg, ref, data, ("test",))["test"])
    from pacl_ray.core.backbones import TextEncoder

    encoder = TextEncoder(export.meta["text_encoder"], "mean", 32)
    texts = encoder.encode(evaluate.class_prompts(cfg.evaluate.prompts[0], ["happy", "sad"])) @ export.text_proj.T
    scores = evaluate.zero_shot_scores(features, torch.nn.functional.normalize(texts, dim=-1), export.image_proj)
    accuracy = 100 * (scores.argmax(1).numpy() == data.splits["test"].targets).mean()
    assert zeroshot[0]["Acc-2"] == pytest.approx(accuracy)

    # a second call is answered from the row cache and merged into the same table
    again = evaluate.evaluate_backbone(cfg, world["export"], "", [task], out_dir, label="again", protocol="linear")
    assert again[0]["Acc-2"] == linear[0]["Acc-2"]
    with open(os.path.join(out_dir, "results.md")) as handle:
        table = handle.read()
    assert "| again | Linear Evaluation |" in table and f"| {TINY_TIMM} + PACL | Zero-shot |" in table


def test_features_in_process_equal_ray_data(ray_local, world, tmp_path):
    task = evaluate.load_task(evaluate.parse_task(f"imagefolder:toy={world['root']}"))
    found = {}
    for max_rows in (0, 4096):  # Ray Data actor pool, then this process
        cfg = _cfg(world)
        cfg.output_dir, cfg.ray.in_process_max_rows = str(tmp_path / f"runs{max_rows}"), max_rows
        ref = evaluate.resolve_backbone(cfg, world["export"])
        found[max_rows] = evaluate.extract_features(cfg, ref, task, ("train", "test"))
    for split in ("train", "test"):
        assert found[0][split].shape == (len(task.splits[split]), found[0][split].shape[1])
        np.testing.assert_allclose(found[4096][split], found[0][split], rtol=1e-5, atol=1e-5)


def _fail_if_called(*args, **kwargs):
    raise AssertionError("features should have come from the cache")


def test_zeroshot_needs_an_export(world):
    with pytest.raises(ExportError, match="needs a PACL export"):
        evaluate.evaluate_backbone(_cfg(world), TINY_TIMM, "", [f"imagefolder:toy={world['root']}"],
                                   os.path.join(world["output"], "x"), protocol="zeroshot")


def test_finetune_runs_and_selects_on_val(world):
    cfg = _cfg(world, finetune_epochs=2, batch_size=8)
    data = evaluate.load_task(evaluate.parse_task(f"imagefolder:toy={world['root']},limit=6"))
    result = evaluate.run_finetune(cfg, evaluate.BackboneRef(TINY_TIMM, "false", label="tiny"), data)
    assert set(result["metrics"]) == {"Acc-2", "F1-2"} and result["best_epoch"] in (0, 1)
    assert 0 <= result["metrics"]["Acc-2"] <= 100


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
