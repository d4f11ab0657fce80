"""FAISS k-means (single process and sharded on Ray actors) against scikit-learn ``KMeans``.

    python benchmarks/kmeans_bench.py                       # the issue's size: 200k x 768, K = 2, 25
    python benchmarks/kmeans_bench.py --n 20000 --dim 256   # quicker

All three fit the same L2-normalised float32 data from the same initial centroids (seeded
k-means++ from :mod:`pacl_ray.core.kmeans`) for the same number of Lloyd iterations (``tol=0``;
scikit-learn with ``n_init=1``, ``algorithm="lloyd"``), so the time ratio compares the Lloyd
loops and the inertia ratio checks they reach the same solution. Data loading (for the sharded
run: shipping the shards to the actors) is excluded from the timings and reported separately.
The data is a mixture of 50 Gaussian groups on the sphere, like pooled features.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def make_data(n: int, dim: int, groups: int, seed: int) -> np.ndarray:
    from pacl_ray.core.kmeans import l2_normalize

    rng = np.random.default_rng(seed)
    centers = l2_normalize(rng.standard_normal((groups, dim), dtype=np.float32))
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x *= 0.7 / np.sqrt(dim)
    x += centers[rng.integers(groups, size=n)]
    return l2_normalize(x)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000, help="points (default 200000)")
    parser.add_argument("--dim", type=int, default=768, help="dimensions (default 768)")
    parser.add_argument("--ks", default="2,25", help="comma-separated K values (default 2,25)")
    parser.add_argument("--max-iter", type=int, default=20, help="Lloyd iterations for every method")
    parser.add_argument("--shards", type=int, default=2, help="Ray actors for the sharded run")
    parser.add_argument("--groups", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-sklearn", action="store_true")
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]

    import faiss
    import ray
    from sklearn.cluster import KMeans

    from pacl_ray.stages import pseudo_labels
    from pacl_ray.core import kmeans

    x, t_data = timed(lambda: make_data(args.n, args.dim, args.groups, args.seed))
    print(f"data {args.n} x {args.dim} float32 ({x.nbytes / 2**20:.0f} MiB) in {t_data:.1f}s; "
          f"{os.cpu_count()} cores, faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), "
          f"max_iter {args.max_iter}, shards {args.shards}")
    init = {k: kmeans.initial_centroids(x, k, args.seed) for k in ks}

    ray.init(num_cpus=max(args.shards, os.cpu_count() or 1), include_dashboard=False, configure_logging=False)
    actors, t_ship = timed(lambda: pseudo_labels.shard_actors({"x": x}, args.shards))
    _, t_ready = timed(lambda: ray.get([a.num_rows.remote() for a in actors]))
    print(f"sharded: {args.shards} actors loaded in {t_ship + t_ready:.1f}s (excluded below)")

    rows = []
    for k in ks:
        single, t_single = timed(lambda: kmeans.kmeans_fit(x, k, max_iter=args.max_iter, tol=0.0, init_centroids=init[k]))
        sharded, t_sharded = timed(lambda: pseudo_labels.fit_distributed(
            actors, [k], "x", max_iter=args.max_iter, tol=0.0, init_centroids={k: init[k]})[k])
        if args.skip_sklearn:
            sk_inertia, t_sk, sk_iter = float("nan"), float("nan"), 0
        else:
            sk = KMeans(k, init=init[k], n_init=1, max_iter=args.max_iter, tol=0.0, algorithm="lloyd", random_state=args.seed)
            _, t_sk = timed(lambda: sk.fit(x))
            sk_inertia, sk_iter = float(sk.inertia_), int(sk.n_iter_)
        rows.append((k, "faiss single", t_single, single.n_iter, single.inertia, t_sk, sk_inertia))
        rows.append((k, f"faiss ray x{args.shards}", t_sharded, sharded.n_iter, sharded.inertia, t_sk, sk_inertia))
        rows.append((k, "sklearn", t_sk, sk_iter, sk_inertia, t_sk, sk_inertia))

    sweep, t_sweep = timed(lambda: pseudo_labels.fit_distributed(
        actors, ks, "x", max_iter=args.max_iter, tol=0.0, init_centroids=init))
    for actor in actors:
        ray.kill(actor)
    ray.shutdown()

    print(f"\n| K | method | seconds | iters | inertia | time / sklearn | inertia / sklearn |")
    print("|---|---|---|---|---|---|---|")
    for k, name, t, it, inertia, t_sk, sk_inertia in rows:
        print(f"| {k} | {name} | {t:.2f} | {it} | {inertia:.6g} | {t / t_sk:.3f} | {inertia / sk_inertia:.6f} |")
    print(f"\nsharded sweep of K={ks} in lockstep from the same resident shards: {t_sweep:.2f}s "
          f"(vs {sum(r[2] for r in rows if r[1].startswith('faiss ray')):.2f}s one K at a time)")


if __name__ == "__main__":
    main()
