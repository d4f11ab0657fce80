"""Stage 3's feed (pure parts): the epoch order over storage chunks, shards, and each rank's chunks."""

from __future__ import annotations

import numpy as np
import pytest

from pacl_ray.stages.train_data import rank_slots
from pacl_ray.stages.train_feed import (
    FeedOrder, epoch_positions, feed_shards, layout_from_files, rank_chunks, singleton_layout,
)


def _layout(n_files=3, rows_per_file=37, chunk_rows=5, seed=0):
    """Files holding a random split of rows 0..N-1 (storage order is not id order)."""
    perm = np.random.default_rng(seed).permutation(n_files * rows_per_file)
    return layout_from_files([perm[i * rows_per_file:(i + 1) * rows_per_file] for i in range(n_files)], chunk_rows)


def test_layout_chunks_cut_each_file():
    layout = layout_from_files([np.array([4, 2, 0]), np.array([1, 3])], chunk_rows=2)
    assert np.diff(layout.bounds).tolist() == [2, 1, 2]
    assert layout.file_index.tolist() == [0, 0, 1] and layout.row_group.tolist() == [0, 1, 0]
    assert layout.chunk_of_row().tolist() == [1, 2, 0, 2, 0]


@pytest.mark.parametrize("batch, wanted, expected", [(8, 16, 8), (64, 16, 16), (12, 16, 12), (24, 16, 12), (7, 4, 1)])
def test_feed_shards_divide_the_global_batch(batch, wanted, expected):
    assert feed_shards(batch, wanted) == expected


def test_positions_fill_whole_global_batches_from_the_phase_only():
    layout = _layout()
    codes = np.random.default_rng(1).integers(1, 5, len(layout.rows))
    pos = epoch_positions(layout, codes, (1, 2, 3), seed=0, epoch=1, global_batch=8, shards=4)
    used = pos >= 0
    assert set(np.flatnonzero(used)) <= set(np.flatnonzero(codes != 4))
    assert sorted(pos[used]) == list(range(used.sum())) and used.sum() % 8 == 0
    # Shard loads differ by at most one chunk: at most chunk_rows * shards / batch steps are lost.
    assert used.sum() // 8 >= (codes != 4).sum() // 8 - 5 * 4 // 8
    assert np.array_equal(pos, epoch_positions(layout, codes, (1, 2, 3), seed=0, epoch=1, global_batch=8, shards=4))
    assert not np.array_equal(pos, epoch_positions(layout, codes, (1, 2, 3), seed=0, epoch=2, global_batch=8, shards=4))


@pytest.mark.parametrize("n, batch", [(32, 8), (103, 8), (250, 12)])
def test_one_row_chunks_give_pairs_over_batch_steps(n, batch):
    codes = np.sort(np.random.default_rng(n).integers(1, 5, n))
    order = FeedOrder(singleton_layout(n), codes, batch, feed_shards(batch, 16), seed=3)
    for phase in [(1,), (1, 2, 3), (1, 2, 3, 4)]:
        assert order.steps(phase, 0) == int(np.isin(codes, phase).sum()) // batch


def test_shard_streams_keep_chunks_together():
    """A chunk's phase rows all go to one shard (one ranged read), consumed in consecutive steps."""
    layout = _layout()
    codes = np.ones(len(layout.rows), dtype=np.int64)
    pos = epoch_positions(layout, codes, (1,), seed=0, epoch=0, global_batch=8, shards=4)
    chunk = layout.chunk_of_row()
    for k in range(layout.num_chunks):
        p = pos[chunk == k]
        p = p[p >= 0]
        assert len(set((p % 8) // 2)) <= 1


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_read_disjoint_chunks_when_world_divides_shards(world):
    layout = _layout(n_files=4, rows_per_file=50, chunk_rows=4)
    codes = np.random.default_rng(2).integers(1, 5, len(layout.rows))
    order = FeedOrder(layout, codes, 16, 4, seed=0)
    pos = order.positions((1, 2, 3, 4), 0)
    per_rank = [rank_chunks(order, pos, *rank_slots(16, r, world), start_step=0) for r in range(world)]
    sets = [{(i["file_index"], i["row_group"]) for i in items} for items in per_rank]
    assert sum(map(len, sets)) == len(set().union(*sets))  # no chunk read twice
    needed = {(int(layout.file_index[k]), int(layout.row_group[k])) for k in np.unique(layout.chunk_of_row()[pos >= 0])}
    assert set().union(*sets) == needed
    for rank, items in enumerate(per_rank):
        firsts = [i["first"] for i in items]
        assert firsts == sorted(firsts)
        lo, hi = rank_slots(16, rank, world)
        assert sorted(p for i in items for p in i["positions"]) == sorted(int(p) for p in pos if p >= 0 and lo <= p % 16 < hi)


def test_resume_reads_only_what_is_left():
    layout = _layout(n_files=2, rows_per_file=40, chunk_rows=4)
    order = FeedOrder(layout, np.ones(80, dtype=np.int64), 8, 4, seed=0)
    pos = order.positions((1,), 0)
    later = rank_chunks(order, pos, 0, 8, start_step=6)
    assert all(p >= 48 for i in later for p in i["positions"])
    assert sum(len(i["rows"]) for i in later) == 80 - 48


def test_small_data_gets_small_chunks():
    from pacl_ray.stages.train_feed import feed_chunk_rows

    assert feed_chunk_rows(32, 64, 8) == 1 and feed_chunk_rows(195_000, 64, 16) == 64
    assert feed_chunk_rows(4096, 64, 16) == 16


def test_layout_and_epoch_order_do_not_depend_on_the_pairs_files_names(tmp_path):
    # A Ray Data write names files with a random write id and which task wrote which rows changes
    # between runs: the same three files under permuted names must give the same epoch order.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pacl_ray.stages.train_data import feed_order
    from pacl_ray.stages.train_feed import chunk_layout, pairs_files

    ids = np.array([f"p{i:03d}" for i in range(30)])
    contents = [ids[10:20][::-1], ids[:10], ids[20:]]  # within a file, storage order is not id order
    layouts = []
    for name, names in (("a", ["x1", "x2", "x3"]), ("b", ["x3", "x1", "x2"])):
        (tmp_path / name).mkdir()
        for file_name, part in zip(names, contents):
            pq.write_table(pa.table({"id": part}), tmp_path / name / f"{file_name}.parquet")
        assert [min(f[1]) for f in pairs_files(str(tmp_path / name))] == ["p000", "p010", "p020"]
        layouts.append(chunk_layout(str(tmp_path / name), ids, chunk_rows=4))
    a, b = layouts
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("rows", "bounds", "file_index", "row_group"))
    codes = np.tile([1, 2, 3, 4, 1], 6)
    positions = [feed_order(codes, 4, 0, 2, layout).positions((1, 2, 3, 4), 3) for layout in layouts]
    assert np.array_equal(*positions)
