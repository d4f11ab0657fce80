"""cluster.yaml (and any sibling cluster*.yaml) validates against the schema that ships with Ray's
autoscaler, and says what the docs promise (CPU head, autoscaled GPU workers, spot option, the
package installed as the README does, one storage bucket)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER_FILES = sorted(REPO.glob("cluster*.yaml"))


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_there_is_a_cluster_yaml():
    assert REPO / "cluster.yaml" in CLUSTER_FILES


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_validates_against_rays_autoscaler_schema(path):
    import jsonschema

    jsonschema.validate(load(path), ray_schema())


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_validates_after_ray_fills_in_its_defaults(path):
    # What `ray up` does before launching anything: merge the provider's defaults, then validate
    # (schema plus Ray's own consistency checks, e.g. head_node_type is a declared node type).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load(path)))


def test_a_broken_config_is_rejected():
    import jsonschema

    config = load(REPO / "cluster.yaml")
    config["available_node_types"]["gpu_worker"]["resources"] = {"GPU": "four"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_schema())


def test_aws_cpu_head_and_autoscaled_gpu_workers():
    config = load(REPO / "cluster.yaml")
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = types["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 4
    assert gpu["min_workers"] <= gpu["max_workers"] <= config["max_workers"]
    spot = [t for t in types.values() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot and all(t["resources"].get("GPU", 0) > 0 for t in spot)


def test_setup_installs_the_package_and_sets_one_bucket():
    config = load(REPO / "cluster.yaml")
    commands = "\n".join(config["setup_commands"])
    assert 'pip install ".[gpu,test]"' in commands  # FAISS on GPU, and the tests for checking a node
    assert "~/pacl_ray" in config["file_mounts"]
    values = json.dumps(config)  # comments (usage examples) are not settings
    assert values.count("s3://") == 1, "the storage bucket should be set in one place"
    assert "output_dir: %s" in commands and "s3://" in commands


def test_every_node_type_has_commented_choices():
    text = (REPO / "cluster.yaml").read_text()
    assert text.count("EDIT") >= 8
