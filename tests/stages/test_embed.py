"""The embed stage through the real Ray Data path and the small-input in-process path: tiny timm
backbone and the offline MiniLM."""

from __future__ import annotations

import copy
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pacl_ray.stages import cache
from pacl_ray.stages import pseudo_labels
from pacl_ray import config
from pacl_ray.stages import embed
from pacl_ray.core import backbones
from pacl_ray.formats import tables
from pacl_ray.formats import storage
from pacl_ray.stages.cache import StageOutput

from conftest import TINY_TIMM

TEXTS = ["a happy dog on the beach", "storm clouds over a grey city", "my cat is so angry today",
         "sunset with friends, pure joy", "lonely empty street at night", "birthday cake and balloons"]


def png_bytes(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def fake_ingest(root: str, n: int = 24) -> StageOutput:
    """A PAIRS table of ``n`` random PNGs of varied sizes, written as two Parquet files."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
        text = f"{TEXTS[i % len(TEXTS)]} #{i}"
        rows.append(dict(
            id=f"p{i:03d}", image=png_bytes(rng, size), image_source=f"mem://{i}", width=size[0], height=size[1],
            converted_from=None, text_raw=text, text=text, anps=None, factual_score=None, emotional_score=None,
            label=None, source=f"test.jsonl:{i + 1}",
        ))
    table = pa.Table.from_pylist(rows, schema=tables.PAIRS)
    storage.makedirs(storage.join(root, "pairs"))
    pq.write_table(table.slice(0, n // 2), storage.join(root, "pairs", "a.parquet"))
    pq.write_table(table.slice(n // 2), storage.join(root, "pairs", "b.parquet"))
    cache.mark_complete(root)
    return StageOutput("ingest", "fake-ingest", root, cached=False)


@pytest.fixture(scope="module")
def embedded(ray_local, tmp_path_factory, minilm_path):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("embed")
    ingest = fake_ingest(str(root / "ingest"))
    # Random-init weights saved as a local checkpoint, so the actors and the test share them.
    checkpoint = str(root / "tiny.safetensors")
    save_file(backbones.create_backbone(TINY_TIMM, "false").model.state_dict(), checkpoint)
    cfg = config.from_dict({
        "output_dir": str(root / "runs"),
        "model": {"backbone": TINY_TIMM, "backbone_pretrained": "false", "backbone_checkpoint": checkpoint,
                  "text_encoder": minilm_path,
                  "text_pooling": "mean", "text_max_length": 32},
        "embed": {"feature_dtype": "float16", "batch_size": 8},
        "cluster": {"ks": [2, 3], "num_shards": 1},
        "ray": {"in_process_max_rows": 0},  # the Ray Data pipeline, however small the input
    })
    return cfg, ingest, embed.run_embed(cfg, ingest)


def test_features_schema_rows_and_values(embedded, minilm_path):
    cfg, ingest, out = embedded
    assert not out.cached
    table = embed.load_features(out)
    m = cfg.model
    backbone = backbones.create_backbone(m.backbone, m.backbone_pretrained, m.backbone_checkpoint)
    encoder = backbones.TextEncoder(minilm_path, "mean", 32)
    assert table.schema.equals(tables.features_schema(backbone.num_features, encoder.dim, pa.float16()))
    pairs = pa.concat_tables([pq.read_table(f) for f in storage.list_files(ingest.path("pairs"), ".parquet")])
    assert sorted(table["id"].to_pylist()) == sorted(pairs["id"].to_pylist())

    # Same features as running the models directly (float16 storage tolerance).
    by_id = {r["id"]: r for r in pairs.to_pylist()}
    ids = table["id"].to_pylist()[:4]
    pixels = torch.stack([
        backbone.eval_transform(Image.open(io.BytesIO(by_id[i]["image"])).convert("RGB")) for i in ids
    ])
    with torch.inference_mode():
        image_ref = backbone.model.eval()(pixels).numpy()
    text_ref = encoder.encode([by_id[i]["text"] for i in ids]).numpy()
    image_got = pseudo_labels.fixed_size_list_to_numpy(table["image_feature"])[:4]
    text_got = pseudo_labels.fixed_size_list_to_numpy(table["text_feature"])[:4]
    np.testing.assert_allclose(image_got, image_ref, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(text_got, text_ref, rtol=2e-3, atol=2e-3)


def test_small_input_in_process_equals_ray_data(embedded, tmp_path):
    cfg, ingest, out = embedded
    assert cache.read_summary(out.uri)["executor"] == "ray_data"
    small = copy.deepcopy(cfg)
    small.output_dir, small.ray.in_process_max_rows = str(tmp_path / "runs"), 4096
    local = embed.run_embed(small, ingest)
    assert cache.read_summary(local.uri)["executor"] == "in_process" and local.key == out.key
    ray_table, local_table = embed.load_features(out).sort_by("id"), embed.load_features(local).sort_by("id")
    assert local_table.schema.equals(ray_table.schema) and local_table["id"].equals(ray_table["id"])
    for column in ("image_feature", "text_feature"):
        np.testing.assert_allclose(pseudo_labels.fixed_size_list_to_numpy(local_table[column]),
                                   pseudo_labels.fixed_size_list_to_numpy(ray_table[column]), rtol=1e-3, atol=1e-3)


def test_rerun_is_cached(embedded):
    cfg, ingest, out = embedded
    again = embed.run_embed(cfg, ingest)
    assert again.cached and again.uri == out.uri and again.key == out.key


def test_cluster_on_embedded_features(embedded):
    cfg, _, out = embedded
    labels = pseudo_labels.load_labels(pseudo_labels.run_cluster(cfg, out), 3)
    assert labels.num_rows == 24
    assert set(labels["factual_label"].to_pylist()) <= {0, 1, 2}


def test_bad_feature_dtype_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="embed.feature_dtype"):  # refused by the config's domain at load
        cfg = config.from_dict({"output_dir": str(tmp_path), "embed": {"feature_dtype": "int8"}})
        embed.run_embed(cfg, StageOutput("ingest", "x", str(tmp_path / "nothing"), cached=False))


def test_text_encoder_returns_input_order_whatever_the_lengths(minilm_path):
    """encode batches texts by length; the rows must still come back in input order."""
    encoder = backbones.TextEncoder(minilm_path, "mean", 32)
    texts = ["a much longer post about a gloomy little star drifting alone #sad", "ok", "happy ball #joy", "calm"]
    together = encoder.encode(texts, batch_size=2)
    one_by_one = torch.cat([encoder.encode([t]) for t in texts])
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-4)
