"""Stage 3's checkpoints: weights-only loading and the resume key."""

from __future__ import annotations

import os

import pytest
import torch

from pacl_ray import config
from pacl_ray.stages.cache import StageOutput
from pacl_ray.stages.checkpoint import (
    OPERATIONAL_SETTINGS, STATE_FILE, CheckpointError, load_state, result_settings, train_key, write_state,
)

UPSTREAM = [StageOutput(stage, f"{stage}-key", f"/data/{stage}", False) for stage in ("ingest", "partition", "embed", "cluster")]


def _key(**train) -> str:
    cfg = config.from_dict({"output_dir": "/out", "train": train})
    return train_key(cfg, *UPSTREAM)


@pytest.mark.parametrize("setting, value", [
    ("max_failures", 5), ("num_workers", 4), ("max_workers", 8), ("log_every_steps", 1),
    ("checkpoint_every_steps", 7), ("in_memory_max_mb", 0.0), ("resources_per_worker", {"CPU": 4}),
])
def test_operational_settings_keep_the_resume_key(setting, value):
    assert setting in OPERATIONAL_SETTINGS
    assert _key(**{setting: value}) == _key()


@pytest.mark.parametrize("setting, value", [
    ("temperature", 0.05), ("epochs", 5), ("global_batch_size", 32), ("k", 3), ("precision", "fp16"),
    ("objective", "clip"), ("lr_heads", 1e-4), ("schedule", "all"),
])
def test_result_settings_change_the_resume_key(setting, value):
    assert setting in result_settings(config.RunConfig().train)
    assert _key(**{setting: value}) != _key()


def test_output_dir_does_not_change_the_key():
    a = train_key(config.from_dict({"output_dir": "/a"}), *UPSTREAM)
    assert a == train_key(config.from_dict({"output_dir": "s3://KEY:SECRET@bucket/b"}), *UPSTREAM)


def _real_state(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    rows = [{"global_step": 0, "epoch": 0, "phase": "1", "total": 1.5, "share_1": 1.0}]
    write_state(str(tmp_path), model, optimizer, scheduler, scaler, {"epoch": 0, "step_in_epoch": 1, "global_step": 1}, rows)
    return os.path.join(tmp_path, STATE_FILE)


def test_a_real_checkpoint_loads_identically_with_weights_only(tmp_path):
    path = _real_state(tmp_path)
    safe = load_state(str(tmp_path))
    full = torch.load(path, map_location="cpu", weights_only=False)
    assert safe.keys() == full.keys() == {"model", "optimizer", "scheduler", "scaler", "counters", "step_rows"}
    for name, value in full["model"].items():
        assert torch.equal(safe["model"][name], value), name
    assert safe["optimizer"]["param_groups"] == full["optimizer"]["param_groups"]
    for index, moments in full["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(safe["optimizer"]["state"][index][name], value)
    assert safe["scheduler"] == full["scheduler"] and safe["scaler"] == full["scaler"]
    assert safe["counters"] == full["counters"] and safe["step_rows"] == full["step_rows"]


class _Planted:
    """Unpickling this runs code (it creates a file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"model": {}, "counters": _Planted(str(marker))}, tmp_path / STATE_FILE)
    with pytest.raises(CheckpointError, match=f"{STATE_FILE}: refused to load"):
        load_state(str(tmp_path))
    assert not marker.exists()
