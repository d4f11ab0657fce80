"""Frozen features: the in-process loop and the Ray Data actor pool agree; images are decoded in a
CPU step before the model actors, and a bad image is reported with its row and file."""

from __future__ import annotations

import numpy as np
import pytest

from pacl_ray.evaluation import features
from pacl_ray.evaluation.resolve import resolve_backbone
from pacl_ray.evaluation.tasks import load_task, parse_task
from toy_world import cfg_for, one_torch_thread, toy_images, world  # noqa: F401 (fixtures)


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


def _corrupt_after_loading(tmp_path):
    """A toy task whose ``train`` image 'happy/1.png' breaks after the reader validated it."""
    task = load_task(parse_task(f"imagefolder:late={toy_images(str(tmp_path / 'late'), n_train=3, n_eval=1)}"))
    row = next(i for i, p in enumerate(task.splits["train"].paths) if p.endswith("happy/1.png"))
    with open(task.splits["train"].paths[row], "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n truncated")
    return task, row


def test_model_actors_get_decoded_pixels_never_files(ray_local, world, tmp_path, monkeypatch):
    """The in-process loop runs the same steps as the Ray Data pipeline: a CPU decode step, then
    the model on float32 pixels. The model never sees a path and never opens a file."""
    from pacl_ray.stages import image_features

    seen = []

    class Spy(features.ImageFeatureExtractor):
        def __call__(self, batch):
            seen.append({k: (np.asarray(v).dtype, np.asarray(v).shape) for k, v in batch.items()})
            return super().__call__(batch)

    def no_files(uri, *args, **kwargs):
        raise AssertionError(f"the model actor opened {uri}")

    monkeypatch.setattr(features, "ImageFeatureExtractor", Spy)
    monkeypatch.setattr(image_features, "load_rgb", no_files)
    cfg = cfg_for(world, batch_size=5)
    cfg.output_dir = str(tmp_path / "runs")
    task = load_task(parse_task(f"imagefolder:toy={world['root']}"))
    out = features.extract_features(cfg, resolve_backbone(cfg, world["export"]), task, ("test",))
    assert out["test"].shape[0] == len(task.splits["test"]) and seen
    for batch in seen:
        assert sorted(batch) == ["pixels", "row"]
        dtype, shape = batch["pixels"]
        assert dtype == np.float32 and len(shape) == 4 and shape[1] == 3


def test_decode_step_names_task_split_row_and_file(tmp_path):
    task, row = _corrupt_after_loading(tmp_path)
    path = task.splits["train"].paths[row]
    transform = features.eval_transform(resolve_backbone(cfg_for({"output": str(tmp_path)})))
    good = features.decode_images({"row": np.array([7]), "path": np.array([task.splits["test"].paths[0]], dtype=object),
                                   "where": np.array(["x"], dtype=object)}, transform)
    assert good["row"].tolist() == [7] and good["pixels"].dtype == np.float32 and good["pixels"].shape[:2] == (1, 3)
    batch = {"row": np.array([0]), "path": np.array([path], dtype=object),
             "where": np.array([f"task 'late' split 'train' row {row}"], dtype=object)}
    with pytest.raises(ValueError) as err:
        features.decode_images(batch, transform)
    assert f"task 'late' split 'train' row {row}, file {path}: cannot read or decode" in str(err.value)


@pytest.mark.parametrize("max_rows", [4096, 0], ids=["in_process", "ray_data"])
def test_an_image_broken_after_loading_is_reported_with_its_row_and_file(ray_local, world, tmp_path, max_rows):
    task, row = _corrupt_after_loading(tmp_path)
    cfg = cfg_for(world)
    cfg.output_dir, cfg.ray.in_process_max_rows = str(tmp_path / "runs"), max_rows
    with pytest.raises(Exception) as err:
        features.extract_features(cfg, resolve_backbone(cfg, world["export"]), task, ("train",))
    message = str(err.value)
    assert f"task 'late' split 'train' row {row}, file {task.splits['train'].paths[row]}" in message
    assert not features.cache.is_complete(features._features_uri(cfg, resolve_backbone(cfg, world["export"]),
                                                                   task.fingerprints["train"]))
