"""Stage 3's feed streamed through Ray Data under an object-store budget (train.feed_object_store_mb):
the budget reaches the feed's own DataContext and changes nothing in the batches."""

from __future__ import annotations

import pytest
import torch

from pacl_ray import config
from pacl_ray.stages.train_data import (
    DEFAULT_FEED_OBJECT_STORE_MB, _Decode, feed_order, load_training_table, rank_batches,
)
from pacl_ray.stages.train_feed import chunk_layout, rank_dataset, write_feed
from pacl_ray.world import stage_tables

CODES = [1] * 10 + [2] * 10 + [3] * 10 + [4] * 10  # 40 pairs: 4 global batches of 8 in phase 1234
TINY_MB = 0.01  # 10 KiB: less than one decoded chunk, so Ray Data runs one read/decode task at a time
PHASE, EPOCH = (1, 2, 3, 4), 1


def tiny_transform():
    """Decode to 8x8 float CHW (the feed's cost is not under test); a torchvision transform, which
    Ray workers can unpickle (a class defined here could not be imported there)."""
    from torchvision import transforms

    return transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])


@pytest.fixture(scope="module")
def feed(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    world = stage_tables.write_stage_tables(root, CODES, 4, image_px=16)
    meta = load_training_table(world["ingest"], world["partition"], world["embed"], world["cluster"], 2)
    pairs = world["ingest"].path("pairs")
    layout = chunk_layout(pairs, meta.column("id").to_numpy(zero_copy_only=False).astype(str), 2)
    files = write_feed("file://" + str(root / "feed"), pairs, meta.drop_columns(["partition"]), 2)
    return files, feed_order(meta.column("partition").to_numpy(), 8, 5, 4, layout)


def test_the_budget_is_set_on_the_feeds_own_data_context(ray_local, feed):
    files, order = feed
    before = ray_local.data.DataContext.get_current().execution_options.resource_limits.object_store_memory
    decode = _Decode(tiny_transform(), order.seed, EPOCH)
    ds = rank_dataset(files, order, PHASE, EPOCH, 0, 0, 4, decode, object_store_mb=TINY_MB)
    options = ds.context.execution_options
    assert options.resource_limits.object_store_memory == int(TINY_MB * 2**20) and options.preserve_order
    assert ray_local.data.DataContext.get_current().execution_options.resource_limits.object_store_memory == before
    with pytest.raises(ValueError, match="feed_object_store_mb"):
        rank_dataset(files, order, PHASE, EPOCH, 0, 0, 4, decode, object_store_mb=0)


def test_one_and_two_workers_stream_the_same_global_batches_under_a_tiny_budget(ray_local, feed):
    files, order = feed
    plan = dict(order=order, phase=PHASE, epoch=EPOCH, start_step=0, transform=tiny_transform(),
                device=torch.device("cpu"), object_store_mb=TINY_MB)
    one = list(rank_batches(files, rank=0, world_size=1, **plan))
    two = [list(rank_batches(files, rank=r, world_size=2, **plan)) for r in range(2)]
    steps = order.steps(PHASE, EPOCH)
    assert steps >= 3 and len(one) == len(two[0]) == len(two[1]) == steps
    for step, (whole, first, second) in enumerate(zip(one, *two)):
        assert whole["position"].tolist() == list(range(step * 8, (step + 1) * 8))
        for name in whole:
            torch.testing.assert_close(torch.cat([first[name], second[name]]), whole[name], rtol=0, atol=0, msg=name)


def test_the_budget_is_a_positive_config_field():
    assert config.RunConfig().train.feed_object_store_mb == DEFAULT_FEED_OBJECT_STORE_MB > 0  # rank_batches' default
    assert config.from_dict({"train": {"feed_object_store_mb": 0.5}}).train.feed_object_store_mb == 0.5
    with pytest.raises(config.ConfigError, match="feed_object_store_mb"):
        config.from_dict({"train": {"feed_object_store_mb": 0}})
