"""Training feed: bytes each worker reads per epoch and peak object-store use, for W = 1, 2, 4
workers, two or more dataset sizes and one or more feed object-store budgets
(``train.feed_object_store_mb``; local Ray with logical CPUs; ``pacl_ray.stages.train_feed``).

    PYTHONPATH=. python benchmarks/train_feed_bench.py [--sizes 1024 4096] [--object-store-mb 1 100000]

For each size a synthetic world (noise PNGs) is written, its feed files built once, and for each
budget and W the W ranks' epoch streams (phase 1234, epoch 0) run concurrently from driver threads,
exactly as ``rank_batches`` runs in each Ray Train worker (each rank its own Ray Data pipeline with
its own budget, as in Ray Train), each rank spending ``--step-ms`` per step as a training step
would (so the feed can run ahead of it). "bytes/worker" is measured: the compressed bytes of the
Parquet row groups each rank read. "peak obj store" is sampled every 20 ms while the epoch runs, through
Ray's public resource view: ``cluster_resources() - available_resources()`` of the
``object_store_memory`` resource (the bytes of live objects in the object store, all ranks
together), minus its value just before the epoch. A budget of 100000 MiB leaves Ray Data's own
default (half the object store) in charge: the contrast the budget removes.
For contrast, the old feed (materialise the joined dataset, every worker filters all of it) needed
all the image bytes per worker per epoch and the whole dataset in the object store: shown as
"old: bytes/worker" and "old: obj store" (computed, not run).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time

import numpy as np
import torch


class SmallTransform:
    """Decode cost kept small: resize to 32 px, CHW float tensor."""

    def __call__(self, img):
        return torch.from_numpy(np.asarray(img.resize((32, 32)), dtype=np.float32).transpose(2, 0, 1).copy())


OBJECT_STORE_BYTES = 512 * 2**20  # Ray Data's default budget is half of it: more than every epoch here


def _object_store_bytes() -> int:
    """Bytes of live objects in the object store (public API: the ``object_store_memory``
    resource's total minus what is available; Ray updates it as objects are created and freed)."""
    import ray

    total = ray.cluster_resources().get("object_store_memory", 0)
    return int(total - ray.available_resources().get("object_store_memory", 0))


class PeakSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.base = _object_store_bytes()
        self.peak, self.stop = 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, _object_store_bytes() - self.base)
            time.sleep(0.02)


def _epoch(files, order, world: int, budget_mb: float, step_s: float) -> tuple[list[int], list[int], int]:
    """(bytes read per rank, rows per rank, peak object-store bytes) of one epoch with W ranks,
    each streaming with an object-store budget of ``budget_mb`` MiB and spending ``step_s``
    seconds on each step (a training step slower than the feed: Ray Data runs ahead)."""
    from pacl_ray.stages.train_data import rank_batches

    read = [[] for _ in range(world)]
    rows = [0] * world

    def rank(r):
        for batch in rank_batches(files, order, (1, 2, 3, 4), 0, 0, r, world, SmallTransform(), torch.device("cpu"),
                                  read_bytes=read[r], object_store_mb=budget_mb):
            rows[r] += len(batch["position"])
            time.sleep(step_s)

    sampler = PeakSampler()
    sampler.start()
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sampler.stop.set()
    sampler.join()
    return [sum(r) for r in read], rows, sampler.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--object-store-mb", type=float, nargs="+", default=[1.0, 100000.0],
                        help="train.feed_object_store_mb values to run (MiB per worker); 100000 = Ray Data's default")
    parser.add_argument("--step-ms", type=float, default=200.0, help="time each rank spends per step (a stand-in "
                        "for the training step); the feed runs ahead of it up to its budget")
    parser.add_argument("--image-px", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--chunk-rows", type=int, default=16)
    parser.add_argument("--shards", type=int, default=16)
    args = parser.parse_args()

    import ray

    from pacl_ray.formats import storage
    from pacl_ray.stages.train_data import feed_order, load_training_table
    from pacl_ray.stages.train_feed import chunk_layout, write_feed
    from pacl_ray.world.stage_tables import write_stage_tables

    ray.init(num_cpus=8, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one "starting execution" line per rank and epoch
    lines = []
    for n in args.sizes:
        root = tempfile.mkdtemp(prefix="pacl-feed-bench-")
        codes = np.random.default_rng(0).integers(1, 5, n)
        world = write_stage_tables(root, codes.tolist(), 16, image_px=args.image_px)
        meta = load_training_table(world["ingest"], world["partition"], world["embed"], world["cluster"], 2)
        pairs = world["ingest"].path("pairs")
        ids = meta.column("id").to_numpy(zero_copy_only=False).astype(str)
        layout = chunk_layout(pairs, ids, args.chunk_rows)
        files = write_feed(storage.join(root, "feed"), pairs, meta.drop_columns(["partition"]), args.chunk_rows)
        total = sum(storage.resolve(f)[0].get_file_info(storage.resolve(f)[1]).size for f in files)
        order = feed_order(meta.column("partition").to_numpy(), args.batch, 0, args.shards, layout)
        for budget in args.object_store_mb:
            for w in args.workers:
                tick = time.perf_counter()
                read, rows, peak = _epoch(files, order, w, budget, args.step_ms / 1000)
                lines.append((n, total, budget, w, read, rows, peak))
                print(f"done N={n} budget={budget:g} MiB W={w} ({time.perf_counter() - tick:.0f} s)", flush=True)
    ray.shutdown()

    mib = 2**20
    decoded = 3 * 32 * 32 * 4  # bytes of one decoded image (SmallTransform)
    print(f"\nfeed: batch {args.batch}, chunk {args.chunk_rows} rows, {args.shards} shards, "
          f"{args.image_px}px noise PNGs decoded to 32px float32 ({decoded / 1024:.0f} KiB each); "
          f"one epoch of phase 1234, {args.step_ms:g} ms per step; budget = train.feed_object_store_mb per worker (100000 = Ray Data's default)")
    header = (f"{'pairs':>6} {'feed MiB':>9} {'decoded MiB':>11} {'budget MiB':>10} {'W':>2} "
              f"{'bytes/worker MiB (mean, max)':>29} {'share':>6} {'rows/worker':>11} {'peak obj store MiB':>19} "
              f"{'old: bytes/worker MiB':>22} {'old: obj store MiB':>19}")
    print(header)
    for n, total, budget, w, read, rows, peak in lines:
        print(f"{n:>6} {total / mib:>9.1f} {n * decoded / mib:>11.1f} {budget:>10g} {w:>2} "
              f"{np.mean(read) / mib:>14.2f}, {max(read) / mib:>12.2f} {np.mean(read) / total:>6.2f} "
              f"{int(np.mean(rows)):>11} {peak / mib:>19.1f} {total / mib:>22.1f} {total / mib:>19.1f}")


if __name__ == "__main__":
    main()
