"""The linear probe on planted signals (and on shuffled labels), and fine-tuning on a toy task."""

from __future__ import annotations

import numpy as np

from conftest import TINY_TIMM
from pacl_ray.core import metrics
from pacl_ray.evaluation import probes
from pacl_ray.evaluation.resolve import BackboneRef
from pacl_ray.evaluation.tasks import load_task, parse_task
from toy_world import cfg_for, one_torch_thread, world  # noqa: F401 (fixtures)


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
    probe = probes.train_linear_probe(x[:400], y[:400], x[400:500], y[400:500], kind, out_dims, epochs=epochs)
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
    assert metrics.multilabel_metrics(truth, scores)["AUC"] > 95
    x, y = _planted("vad")
    _, values, truth = _probe("vad", x, y, [3], epochs=20)
    assert metrics.vad_metrics(truth, values)["R2"] > 0.9


# --------------------------------------------------------------------------- fine-tuning


def test_finetune_runs_and_selects_on_val(world, monkeypatch, capsys):
    from console_capture import heartbeat

    cfg = cfg_for(world, finetune_epochs=2, batch_size=8)
    data = load_task(parse_task(f"imagefolder:toy={world['root']},limit=6"))
    # Progress: a slow validation (a fake that returns once the heartbeat has named it) gets a
    # line saying so, with the steps done.
    stderr = heartbeat(monkeypatch)
    task_metrics = metrics.task_metrics

    def slow_task_metrics(*args):
        if "validating after epoch 1" not in stderr.text:
            stderr.wait_for("[evaluate] finetune tiny on toy: still running: validating after epoch 1, ")
        return task_metrics(*args)

    monkeypatch.setattr(probes.metrics, "task_metrics", slow_task_metrics)
    result = probes.run_finetune(cfg, BackboneRef(TINY_TIMM, "false", label="tiny"), data)
    assert set(result["metrics"]) == {"Acc-2", "F1-2"} and result["best_epoch"] in (0, 1)
    assert 0 <= result["metrics"]["Acc-2"] <= 100
    validating = stderr.lines("[evaluate] finetune tiny on toy: still running: validating after epoch 1, ")
    assert validating[0].rsplit("; ", 1)[1].endswith(" steps")
    epochs = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[evaluate] finetune")]
    assert [line.split(" val ")[0] for line in epochs] == [
        "[evaluate] finetune tiny on toy: epoch 1/2", "[evaluate] finetune tiny on toy: epoch 2/2"]
    assert all("{" not in line for line in epochs)  # metrics as "Acc-2 50, F1-2 33.33", not a dict repr


def test_linear_probe_progress(world, monkeypatch):
    """run_linear: no line for a quick probe; a slow epoch (a fake that returns once the
    heartbeat has shown the count) gets lines counting epochs."""
    from console_capture import heartbeat, quiet

    cfg = cfg_for(world, linear_epochs=3, batch_size=8)
    data = load_task(parse_task(f"imagefolder:toy={world['root']},limit=6"))
    ref = BackboneRef(TINY_TIMM, "false", label="tiny")
    stderr = quiet(monkeypatch)
    quick = probes.run_linear(cfg, ref, data)
    assert stderr.lines("[evaluate] linear probe") == []

    stderr = heartbeat(monkeypatch)
    selection_score = metrics.selection_score

    def slow_selection_score(kind, values):
        if "linear probe tiny on toy: 1/3 epochs" not in stderr.text:  # the second epoch waits
            stderr.wait_for("[evaluate] linear probe tiny on toy: 0/3 epochs [")
        return selection_score(kind, values)

    monkeypatch.setattr(probes.metrics, "selection_score", slow_selection_score)
    assert probes.run_linear(cfg, ref, data) == quick
    assert stderr.lines("[evaluate] linear probe tiny on toy: 3/3 epochs [")  # shown before: the last count
