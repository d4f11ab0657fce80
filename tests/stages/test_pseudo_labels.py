"""Sharded k-means on Ray actors against single-process FAISS, and the cluster stage."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pacl_ray.stages import cache
from pacl_ray.stages import pseudo_labels
from pacl_ray import config
from pacl_ray.core import kmeans
from pacl_ray.formats import tables
from pacl_ray.formats import storage
from pacl_ray.stages.cache import StageOutput

def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Labels equal up to a permutation of cluster ids."""
    pairs = set(zip(np.asarray(a).tolist(), np.asarray(b).tolist()))
    return len(pairs) == len(set(np.asarray(a).tolist())) == len(set(np.asarray(b).tolist()))


def blobs(n_per: int, centers: np.ndarray, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(centers)), n_per)
    x = centers[truth] + noise * rng.standard_normal((len(truth), centers.shape[1]))
    return x.astype(np.float32), truth


def planted_empty_cluster() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two blobs and a small far group; the third initial centroid attracts nothing at first."""
    x, truth = blobs(20, np.array([[0.0, 0.0], [10.0, 0.0], [5.0, 6.0]]), noise=0.1, seed=4)
    keep = np.r_[0:45]  # 5 points in the far group
    return x[keep], truth[keep], np.array([[0.0, 0.0], [10.0, 0.0], [100.0, 100.0]], np.float32)


def well_separated(n_per: int = 40, dim: int = 12, groups: int = 5, seed: int = 0) -> np.ndarray:
    """L2-normalised points in tight groups around random unit directions (float32 [N, dim])."""
    centers = kmeans.l2_normalize(np.random.default_rng(seed).standard_normal((groups, dim)))
    x, _ = blobs(n_per, centers, noise=0.03, seed=seed)
    return kmeans.l2_normalize(x)


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_sharded_matches_single_process(ray_local, num_shards):
    x = well_separated()
    ks = [2, 3, 5]
    init = {k: kmeans.initial_centroids(x, k, seed=11) for k in ks}
    actors = pseudo_labels.shard_actors({"v": x}, num_shards)
    try:
        got = pseudo_labels.fit_distributed(actors, ks, "v", max_iter=30, tol=0.0, init_centroids=init)
        seeded = pseudo_labels.fit_distributed(actors, ks, "v", seed=11, max_iter=30, tol=0.0)
    finally:
        for actor in actors:
            ray_local.kill(actor)
    for k in ks:
        ref = kmeans.kmeans_fit(x, k, max_iter=30, tol=0.0, init_centroids=init[k])
        assert same_partition(got[k].labels, ref.labels)
        np.testing.assert_allclose(got[k].centroids.astype(np.float64), ref.centroids.astype(np.float64), atol=1e-5)
        assert got[k].inertia == pytest.approx(ref.inertia, rel=1e-5, abs=1e-6)
        assert got[k].n_iter == ref.n_iter
        # The seeded init samples by global row index, so it does not depend on the sharding.
        np.testing.assert_array_equal(seeded[k].labels, kmeans.kmeans_fit(x, k, seed=11, max_iter=30, tol=0.0).labels)


def test_sharded_empty_cluster_reseed_matches_single_process(ray_local):
    x, truth, init = planted_empty_cluster()
    actors = pseudo_labels.shard_actors({"v": x}, 3)
    try:
        got = pseudo_labels.fit_distributed(actors, [3], "v", init_centroids={3: init})[3]
    finally:
        for actor in actors:
            ray_local.kill(actor)
    ref = kmeans.kmeans_fit(x, 3, init_centroids=init)
    np.testing.assert_array_equal(got.labels, ref.labels)
    np.testing.assert_allclose(got.centroids, ref.centroids, atol=1e-5)
    assert same_partition(got.labels, truth)


def test_local_shards_without_ray():
    x = well_separated(groups=3)
    shards = [pseudo_labels.ShardWorker({"v": x[a:b]}, offset=a) for a, b in pseudo_labels.split_offsets(len(x), 2)]
    got = pseudo_labels.fit_distributed(shards, [3], "v", seed=0)[3]
    ref = kmeans.kmeans_fit(x, 3, seed=0)
    np.testing.assert_array_equal(got.labels, ref.labels)


def test_fit_distributed_counts_iterations(monkeypatch):
    """Each Lloyd iteration adds one to the progress; convergence takes the iterations it leaves
    out off the total; the uncounted steps are named while they run."""
    import io

    from pacl_ray.stages import runtime

    monkeypatch.setattr(runtime, "interactive", lambda: False)
    x = well_separated(groups=3)
    shards = [pseudo_labels.ShardWorker({"v": x})]
    stream = io.StringIO()
    progress = runtime.Progress("[cluster] k-means", 50, "iterations", interval=0.0, stream=stream)
    phases = []
    final = pseudo_labels.ShardWorker.final
    monkeypatch.setattr(pseudo_labels.ShardWorker, "final",
                        lambda self, *a: phases.append(progress.phase) or final(self, *a))
    got = pseudo_labels.fit_distributed(shards, [3], "v", seed=0, max_iter=50, progress=progress)[3]
    counted = [line for line in stream.getvalue().splitlines() if "still running" not in line]
    assert len(counted) == got.n_iter < 50 and progress.done == progress.total == got.n_iter
    assert counted[0].startswith("[cluster] k-means: 1/50 iterations [")
    assert phases == ["v final assignment"]


def test_run_cluster_heartbeat_names_the_slow_step(tmp_path, monkeypatch):
    """A slow final assignment (a fake that returns once the heartbeat has named it) gets lines
    saying what runs and how many iterations are done; a quick run prints none."""
    from console_capture import heartbeat, quiet

    embed = write_features(str(tmp_path / "embed"), 40)
    cfg = config.from_dict({"output_dir": str(tmp_path / "quick"), "cluster": {"ks": [2], "num_shards": 1}})
    stderr = quiet(monkeypatch)
    pseudo_labels.run_cluster(cfg, embed)
    assert stderr.lines("[cluster]") == []

    stderr = heartbeat(monkeypatch)
    final = pseudo_labels.ShardWorker.final

    def slow_final(self, modality, centroids):
        stderr.wait_for(f"[cluster] k-means: still running: {modality} final assignment, ")
        return final(self, modality, centroids)

    monkeypatch.setattr(pseudo_labels.ShardWorker, "final", slow_final)
    cfg = config.from_dict({"output_dir": str(tmp_path / "slow"), "cluster": {"ks": [2], "num_shards": 1}})
    pseudo_labels.run_cluster(cfg, embed)
    lines = stderr.lines("[cluster] k-means: ")
    emotional = [line for line in lines if "emotional final assignment" in line]
    assert emotional and all(line.endswith(" iterations") and "/" in line.rsplit("; ", 1)[1] for line in emotional)


def test_fit_distributed_fewer_points_than_k():
    shards = [pseudo_labels.ShardWorker({"v": np.eye(3, dtype=np.float32)})]
    with pytest.raises(kmeans.NotEnoughPointsError, match="K=4"):
        pseudo_labels.fit_distributed(shards, [2, 4], "v")


# --------------------------------------------------------------------------- stage


def write_features(uri: str, n: int, seed: int = 0, files: int = 2) -> StageOutput:
    """A fake embed stage output: ``files`` FEATURES Parquet files with grouped features."""
    image = well_separated(n_per=n // 4, dim=10, groups=4, seed=seed)
    text = well_separated(n_per=n // 4, dim=6, groups=4, seed=seed + 1)[::-1].copy()
    ids = [f"pair-{i:04d}" for i in range(len(image))]
    storage.makedirs(storage.join(uri, "features"))
    for part, (a, b) in enumerate(pseudo_labels.split_offsets(len(ids), files)):
        table = pa.Table.from_arrays(
            [
                pa.array(ids[a:b]),
                pa.FixedSizeListArray.from_arrays(pa.array(image[a:b].reshape(-1)), 10),
                pa.FixedSizeListArray.from_arrays(pa.array(text[a:b].reshape(-1)), 6),
            ],
            schema=tables.features_schema(10, 6),
        )
        pq.write_table(table, storage.join(uri, "features", f"part-{part}.parquet"))
    cache.mark_complete(uri)
    return StageOutput("embed", f"fake{seed}{n}", uri, cached=False)


@pytest.mark.parametrize("num_shards", [1, 2])
def test_run_cluster_writes_labels_centroids_report_and_caches(ray_local, tmp_path, output_dir, num_shards, capsys):
    embed = write_features(str(tmp_path / "embed"), 80)
    cfg = config.from_dict(
        {"output_dir": output_dir, "seed": 3, "cluster": {"ks": [4, 2], "num_shards": num_shards}}
    )
    out = pseudo_labels.run_cluster(cfg, embed)
    assert not out.cached
    assert "K=  4 factual" in capsys.readouterr().out

    files = storage.list_files(out.path("labels"), ".parquet")
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert table.schema.equals(tables.labels_schema([2, 4]))
    assert table[tables.ID].to_pylist() == [f"pair-{i:04d}" for i in range(80)]
    labels4 = pseudo_labels.load_labels(out, 4)
    assert labels4.column_names == ["id", "factual_label", "emotional_label"]
    # Grouped rows: the 4 factual groups are contiguous, the 4 emotional groups reversed.
    truth = np.repeat(np.arange(4), 20)
    assert same_partition(np.asarray(labels4["factual_label"]), truth)
    assert same_partition(np.asarray(labels4["emotional_label"]), truth[::-1])

    report = json.loads(storage.read_text(out.path("report.json")))
    assert report["per_k"]["4"]["factual"]["sizes"] == [20, 20, 20, 20]
    assert sum(report["per_k"]["2"]["emotional"]["sizes"]) == 80
    from safetensors.numpy import load_file

    centroids = load_file(out.path("centroids", "k4.safetensors"))
    assert centroids["factual"].shape == (4, 10) and centroids["emotional"].shape == (4, 6)
    assert storage.exists(out.path("config.yaml"))
    with pytest.raises(KeyError, match="K=3"):
        pseudo_labels.load_labels(out, 3)

    again = pseudo_labels.run_cluster(cfg, embed)
    assert again.cached and again.uri == out.uri


def test_run_cluster_sharded_equals_single_process(ray_local, tmp_path):
    embed = write_features(str(tmp_path / "embed"), 120, seed=5, files=3)
    results = []
    for shards in (1, 3):
        cfg = config.from_dict(
            {"output_dir": str(tmp_path / f"runs{shards}"), "cluster": {"ks": [3, 6], "num_shards": shards}}
        )
        out = pseudo_labels.run_cluster(cfg, embed)
        results.append(pseudo_labels.load_labels(out, 6))
    assert results[0].equals(results[1])


def test_run_cluster_fewer_points_than_k(tmp_path, output_dir):
    embed = write_features(str(tmp_path / "embed"), 8)
    cfg = config.from_dict({"output_dir": output_dir, "cluster": {"ks": [2, 25], "num_shards": 1}})
    with pytest.raises(kmeans.NotEnoughPointsError, match=r"features .*K=25 clusters need at least 25 points, got 8"):
        pseudo_labels.run_cluster(cfg, embed)


def test_run_cluster_does_not_depend_on_row_order(tmp_path):
    """The embed stage's rows come back in a different order each run (Ray Data); the labels of
    each id must not change with it."""
    embed = write_features(str(tmp_path / "embed"), n=120, files=2)
    table = pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "embed" / "features").glob("*.parquet"))])
    shuffled = table.take(pa.array(np.random.default_rng(5).permutation(table.num_rows)))
    other = tmp_path / "embed-shuffled" / "features"
    other.mkdir(parents=True)
    pq.write_table(shuffled.slice(0, 50), other / "part-0.parquet")
    pq.write_table(shuffled.slice(50), other / "part-1.parquet")
    embed_shuffled = StageOutput("embed", embed.key, str(tmp_path / "embed-shuffled"), False)

    def labels(source: StageOutput, out: str) -> dict:
        cfg = config.from_dict({"output_dir": str(tmp_path / out), "cluster": {"ks": [3, 7], "num_shards": 1}})
        got = pq.read_table(cache.stage_uri(cfg.output_dir, "cluster", pseudo_labels.run_cluster(cfg, source).key)
                            + "/labels").to_pydict()
        return {name: dict(zip(got[tables.ID], got[name])) for name in got if name != tables.ID}

    assert labels(embed, "a") == labels(embed_shuffled, "b")
