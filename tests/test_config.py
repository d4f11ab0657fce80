"""Typed config: YAML + dotted overrides, errors that name the key, round trip through save."""

from __future__ import annotations

import pytest
import yaml

from pacl_ray import config as C
from pacl_ray.formats import storage


def test_defaults_follow_the_paper():
    cfg = C.RunConfig()
    assert cfg.partition.sigma == 0.7 and cfg.cluster.ks == [2] and cfg.train.temperature == 0.07
    assert cfg.train.epochs == 30 and cfg.train.global_batch_size == 64
    assert cfg.train.lr_heads == 1e-3 and cfg.model.embed_dim == 768
    assert cfg.evaluate.linear_lr == 1e-2 and cfg.evaluate.linear_epochs == 40


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 3, "temperature": 0.05}, "cluster": {"ks": [2, 3]}}))
    cfg = C.load_config(str(path), ["train.epochs=30", "partition.sigma=1", "cluster.ks=[2, 6]", "name=x"])
    assert cfg.train.epochs == 30 and cfg.train.temperature == 0.05
    assert cfg.partition.sigma == 1.0 and isinstance(cfg.partition.sigma, float)
    assert cfg.cluster.ks == [2, 6] and cfg.name == "x"


def test_exponent_floats_without_a_dot():
    # PyYAML reads "3e-3" as a string (YAML 1.1); a float field still takes it, a string field keeps it
    path_cfg = C.load_config(None, ["train.lr_backbone=3e-3", "train.lr_heads=-1E2", "name=1e3"])
    assert path_cfg.train.lr_backbone == 3e-3 and path_cfg.train.lr_heads == -100.0 and path_cfg.name == "1e3"
    with pytest.raises(C.ConfigError, match="train.lr_heads"):
        C.load_config(None, ["train.lr_heads=e-3"])


def test_optional_fields_accept_null_and_values():
    cfg = C.load_config(None, ["train.max_workers=4", "partition.sigma_factual=null"])
    assert cfg.train.max_workers == 4 and cfg.partition.sigma_factual is None


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.epochz=3", "train.epochz"),
        ("trian.epochs=3", "trian"),
        ("train.epochs=three", "train.epochs"),
        ("train.epochs=1.5", "train.epochs"),
        ("cluster.ks=2", "cluster.ks"),
        ("cluster.ks=[2, x]", r"cluster.ks\[1\]"),
        ("ingest.clean_text=maybe", "ingest.clean_text"),
        ("train=3", "train"),
        ("no_equals_sign", "section.key=value"),
    ],
)
def test_bad_keys_and_types_name_the_key(override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load_config(None, [override])


def test_bad_yaml_top_level(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(C.ConfigError, match="mapping"):
        C.load_config(str(path))


def test_save_round_trip_through_file_uri(tmp_path):
    cfg = C.load_config(None, ["train.epochs=5", "cluster.ks=[2,3]"])
    uri = C.save_config(cfg, f"file://{tmp_path}/run")
    assert uri.startswith("file://")
    again = C.load_config(uri)
    assert again == cfg
    assert storage.exists(str(tmp_path / "run" / "config.yaml"))


def test_merge_is_deep():
    merged = C.merge({"train": {"epochs": 3, "k": 2}}, {"train": {"epochs": 5}, "name": "n"})
    assert merged == {"train": {"epochs": 5, "k": 2}, "name": "n"}
