"""pacl_ray.stages.executor: the same UDFs in this process and on Ray Data give the same rows;
actor pools autoscale between the configured bounds and leave CPUs for the read/decode/write tasks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pacl_ray.config import EmbedConfig, EvaluateConfig, PartitionConfig, RayConfig
from pacl_ray.formats import storage
from pacl_ray.stages import executor
from pacl_ray.stages.executor import ActorPool, Udf

OUT = pa.schema([pa.field("id", pa.string()), pa.field("y", pa.float64())])


def add_offset(batch: dict, offset: float) -> dict:
    return {"id": batch["id"], "x": np.asarray(batch["x"], dtype=np.float64) + offset}


class Scale:
    """A callable class: built once per actor, counts its constructions (in process: once)."""

    built = 0

    def __init__(self, factor: float):
        Scale.built += 1
        self.factor = factor

    def __call__(self, batch: dict) -> pa.Table:
        return pa.table({"id": batch["id"], "y": batch["x"] * self.factor}, schema=OUT)


def _input(n: int = 23) -> pa.Table:
    return pa.table({"id": [f"r{i:02d}" for i in range(n)], "x": np.arange(n, dtype=np.float64)})


UDFS = [Udf(add_offset, {"offset": 1.0}), Udf(Scale, {"factor": 2.0}, actor=True)]


def test_in_process_runs_each_step_and_builds_classes_once():
    Scale.built = 0
    out = executor.apply_in_process(_input(), UDFS, batch_size=5)
    assert Scale.built == 1
    assert out.column("y").to_pylist() == [2.0 * (i + 1) for i in range(23)]
    assert executor.apply_in_process(_input(0), UDFS, batch_size=5, empty=OUT).num_rows == 0
    with pytest.raises(ValueError, match="no input rows"):
        executor.apply_in_process(_input(0), UDFS, batch_size=5)
    prebuilt = Scale(3.0)
    out = executor.apply_in_process(_input(), [UDFS[0], Udf(Scale, {"factor": 2.0}, actor=True, instance=prebuilt)], 5)
    assert out.column("y").to_pylist() == [3.0 * (i + 1) for i in range(23)]


def test_in_process_threshold():
    cfg = RayConfig(in_process_max_rows=10)
    assert executor.runs_in_process(10, cfg) and not executor.runs_in_process(11, cfg)
    assert not executor.runs_in_process(1, RayConfig(in_process_max_rows=0))


def test_ray_data_gives_the_in_process_rows(ray_local, tmp_path):
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules
    pool = ActorPool(num_gpus=0)
    local = executor.run_udfs_on_table(_input(), UDFS, pool=pool, batch_size=5, ray_cfg=RayConfig())
    remote = executor.run_udfs_on_table(_input(), UDFS, pool=pool, batch_size=5,
                                        ray_cfg=RayConfig(in_process_max_rows=0))
    assert remote.sort_by("id").equals(local)

    src = str(tmp_path / "in")
    storage.write_parquet(_input(), src)
    ran = [executor.run_udfs(src, ["id", "x"], UDFS, str(tmp_path / name), pool=pool, batch_size=5,
                             ray_cfg=RayConfig(in_process_max_rows=rows))
           for name, rows in (("a", 100), ("b", 0))]
    assert ran == [executor.IN_PROCESS, executor.RAY_DATA]
    a, b = (storage.read_parquet_dir(str(tmp_path / n)).sort_by("id") for n in "ab")
    assert a.equals(b.select(a.column_names).cast(a.schema)) and a.num_rows == 23


def test_cpu_actor_pools_leave_half_the_cpus_free(ray_local):
    cpus = ray_local.cluster_resources()["CPU"]
    args = executor.actor_pool_args(ActorPool(min_actors=1, max_actors=4, num_gpus=1, pools=2), batch_size=8)
    assert "num_gpus" not in args and args["batch_size"] == 8 and args["batch_format"] == "numpy"
    assert args["num_cpus"] * 4 * 2 <= cpus / 2 + 1e-9  # every pool at its largest still leaves half
    assert executor.actor_pool_args(ActorPool(), 8)["num_cpus"] <= 1.0


@pytest.mark.parametrize("section", [PartitionConfig, EmbedConfig, EvaluateConfig])
def test_pools_autoscale_between_the_configured_bounds(section, monkeypatch):
    from pacl_ray.stages import runtime

    monkeypatch.setattr(runtime, "cluster_gpus", lambda: 8.0)
    monkeypatch.setattr(runtime, "cluster_cpus", lambda: 64.0)
    cfg = section(min_actors=2, max_actors=5, num_gpus=0.5)
    args = executor.actor_pool_args(executor.actor_pool(cfg, pools=2), batch_size=16)
    strategy = args["compute"]
    assert (strategy.min_size, strategy.max_size) == (2, 5)
    assert args["num_gpus"] == 0.5 and "num_cpus" not in args
    # the defaults keep one actor per model (a laptop run)
    default = executor.actor_pool_args(executor.actor_pool(section()), batch_size=16)["compute"]
    assert (default.min_size, default.max_size) == (1, 1)


def test_actor_pool_rejects_bounds_out_of_order():
    with pytest.raises(ValueError, match="min_actors=3, max_actors=2"):
        ActorPool(min_actors=3, max_actors=2)
    with pytest.raises(ValueError, match="min_actors=0"):
        ActorPool(min_actors=0)


def test_matrix_outputs_become_fixed_size_lists():
    def widen(batch: dict) -> dict:
        return {"id": batch["id"], "feature": np.stack([batch["x"], -batch["x"]], axis=1).astype(np.float32)}

    out = executor.apply_in_process(_input(4), [Udf(widen)], batch_size=3)
    assert out.column("feature").type == pa.list_(pa.float32(), 2)
    assert out.column("feature").to_pylist()[3] == [3.0, -3.0]


def batch_centered(batch: dict) -> dict:
    """Each row's output depends on its batch (like a model's last bits under BLAS blocking)."""
    x = np.asarray(batch["x"], dtype=np.float64)
    return {"id": batch["id"], "y": x - x.mean()}


def test_in_process_batches_are_in_id_order_whatever_the_file_order(ray_local, tmp_path):
    # A Ray Data write leaves its files in no fixed order: here the first file by name holds the
    # last ids. The in-process path must batch in id order, so its output does not depend on it.
    import pyarrow.parquet as pq

    table = _input()
    for name, part in (("shuffled", [table.slice(12), table.slice(0, 12)]), ("ordered", [table])):
        (tmp_path / name).mkdir()
        for i, chunk in enumerate(part):
            pq.write_table(chunk, tmp_path / name / f"part-{i}.parquet")
    for name in ("shuffled", "ordered"):
        executor.run_udfs(str(tmp_path / name), ["id", "x"], [Udf(batch_centered)], str(tmp_path / f"out_{name}"),
                          pool=ActorPool(num_gpus=0), batch_size=5, ray_cfg=RayConfig())
    shuffled, ordered = (storage.read_parquet_dir(str(tmp_path / f"out_{n}")) for n in ("shuffled", "ordered"))
    assert shuffled.equals(ordered)
    expected = np.concatenate([c - c.mean() for c in np.array_split(np.arange(23.0), range(5, 23, 5))])
    np.testing.assert_array_equal(shuffled.column("y").to_numpy(), expected)
    assert executor.in_id_order(pa.table({"x": [2, 1]})).column("x").to_pylist() == [2, 1]  # no id: as given
