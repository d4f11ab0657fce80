"""Frozen features: the in-process loop and the Ray Data actor pool agree."""

from __future__ import annotations

import numpy as np

from pacl_ray.evaluation import features
from pacl_ray.evaluation.resolve import resolve_backbone
from pacl_ray.evaluation.tasks import load_task, parse_task
from toy_world import cfg_for, one_torch_thread, world  # noqa: F401 (fixtures)


def test_features_in_process_equal_ray_data(ray_local, world, tmp_path):
    task = load_task(parse_task(f"imagefolder:toy={world['root']}"))
    found = {}
    for max_rows in (0, 4096):  # Ray Data actor pool, then this process
        cfg = cfg_for(world)
        cfg.output_dir, cfg.ray.in_process_max_rows = str(tmp_path / f"runs{max_rows}"), max_rows
        ref = resolve_backbone(cfg, world["export"])
        found[max_rows] = features.extract_features(cfg, ref, task, ("train", "test"))
    for split in ("train", "test"):
        assert found[0][split].shape == (len(task.splits[split]), found[0][split].shape[1])
        np.testing.assert_allclose(found[4096][split], found[0][split], rtol=1e-5, atol=1e-5)
