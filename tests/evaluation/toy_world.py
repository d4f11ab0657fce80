"""Shared pieces of the evaluation tests: a toy ImageFolder task, a hand-made PACL export and the
config that evaluates them (imported by the test modules; fixtures included)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_TIMM
from pacl_ray import config as config_mod


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core CI box the thread
    pool's synchronisation makes each step ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def toy_images(root, n_train=8, n_eval=3):
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


def make_export(directory, minilm_path, embed_dim=16, head_names=("image_proj.weight", "text_proj.weight")):
    """A PACL export made by hand: test_resnet weights + random heads + MiniLM as the text encoder
    (``head_names``: the tensor names of the heads, to write the legacy ``*_head`` names too)."""
    from safetensors.torch import save_file

    from pacl_ray.core.backbones import create_backbone

    torch.manual_seed(0)
    backbone = create_backbone(TINY_TIMM, "false")
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()},
              os.path.join(directory, "backbone.safetensors"))
    save_file({head_names[0]: torch.randn(embed_dim, backbone.num_features),
               head_names[1]: torch.randn(embed_dim, 384)}, os.path.join(directory, "heads.safetensors"))
    meta = {"backbone": TINY_TIMM, "text_encoder": minilm_path, "text_pooling": "mean",
            "text_max_length": 32, "embed_dim": embed_dim, "backbone_pretrained": "false"}
    with open(os.path.join(directory, "export.json"), "w") as handle:
        json.dump(meta, handle)
    return directory


@pytest.fixture(scope="module")
def world(tmp_path_factory, minilm_path):
    base = tmp_path_factory.mktemp("evaluate")
    root = toy_images(str(base / "toy"))
    export = make_export(str(base / "export"), minilm_path)
    return {"root": root, "export": export, "output": str(base / "runs")}


def cfg_for(world, **evaluate_fields) -> config_mod.RunConfig:
    return config_mod.from_dict({"output_dir": world["output"], "model": {"backbone": TINY_TIMM},
                                 "evaluate": {"linear_epochs": 15, "batch_size": 16, **evaluate_fields}})
