"""Training feed: bytes each worker reads per epoch and peak object-store use, for W = 1, 2, 4
workers and two dataset sizes (local Ray with logical CPUs; ``pacl_ray.stages.train_feed``).

    PYTHONPATH=. python benchmarks/train_feed_bench.py [--sizes 512 2048] [--image-px 96]

For each size a synthetic world (noise PNGs) is written, its feed files built once, and for each W
the W ranks' epoch streams (phase 1234, epoch 0) run concurrently from driver threads, exactly as
``rank_batches`` runs in each Ray Train worker. "bytes/worker" is measured: the compressed bytes of
the Parquet row groups each rank read. "peak object store" is sampled every 50 ms from Ray's
object-store statistics (bytes needed by referenced objects, as ``ray memory --stats-only``
prints) while the epoch runs.
For contrast, the old feed (materialise the joined dataset, every worker filters all of it) needed
all the image bytes per worker per epoch and the whole dataset in the object store: shown as
"old: bytes/worker" and "old: object store" (computed, not run).
"""

from __future__ import annotations

import argparse
import re
import tempfile
import threading
import time

import numpy as np
import torch


class SmallTransform:
    """Decode cost kept small: resize to 32 px, CHW float tensor."""

    def __call__(self, img):
        return torch.from_numpy(np.asarray(img.resize((32, 32)), dtype=np.float32).transpose(2, 0, 1).copy())


OBJECT_STORE_BYTES = 512 * 2**20  # small, so that the 0.1 % resolution of Ray's figure is 0.5 MiB


def _object_store_bytes() -> int:
    """Object-store bytes *needed* (pinned: referenced objects' primary copies), from Ray's own
    statistics (the public equivalent is ``ray memory --stats-only``). Its "usage" figure also
    counts released objects that plasma keeps until it needs the space, so it is not used."""
    import ray
    from ray._private.internal_api import memory_summary

    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    match = re.search(r"([\d.]+)% needed", summary)
    return int(float(match.group(1)) / 100 * OBJECT_STORE_BYTES) if match else 0


class PeakSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, _object_store_bytes())
            time.sleep(0.05)


def _epoch(files, order, world: int) -> tuple[list[int], list[int], int]:
    """(bytes read per rank, rows per rank, peak object-store bytes) of one epoch with W ranks."""
    from pacl_ray.stages.train_data import rank_batches

    read = [[] for _ in range(world)]
    rows = [0] * world

    def rank(r):
        for batch in rank_batches(files, order, (1, 2, 3, 4), 0, 0, r, world, SmallTransform(), torch.device("cpu"),
                                  read_bytes=read[r]):
            rows[r] += len(batch["position"])

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
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--image-px", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--chunk-rows", type=int, default=16)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--data-limit-mb", type=float, default=0,
                        help="Ray Data object-store limit (DataContext resource_limits); 0 = Ray Data's default")
    args = parser.parse_args()

    import ray

    from pacl_ray.formats import storage
    from pacl_ray.stages.train_data import feed_order, load_training_table
    from pacl_ray.stages.train_feed import chunk_layout, write_feed
    from pacl_ray.world.stage_tables import write_stage_tables

    ray.init(num_cpus=8, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    if args.data_limit_mb:
        context.execution_options.resource_limits = ray.data.ExecutionResources.for_limits(
            object_store_memory=args.data_limit_mb * 2**20)
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
        for w in args.workers:
            read, rows, peak = _epoch(files, order, w)
            lines.append((n, total, w, read, rows, peak))
            print(f"done N={n} W={w}", flush=True)
    ray.shutdown()

    mib = 2**20
    print(f"\nfeed: batch {args.batch}, chunk {args.chunk_rows} rows, {args.shards} shards, "
          f"{args.image_px}px noise PNGs, Ray Data object-store limit {args.data_limit_mb or 'default'} MiB; "
          f"one epoch of phase 1234")
    header = (f"{'pairs':>6} {'feed MiB':>9} {'W':>2} {'bytes/worker MiB (mean, max)':>29} {'share':>6} "
              f"{'rows/worker':>11} {'peak obj store MiB':>19} {'old: bytes/worker MiB':>22} {'old: obj store MiB':>19}")
    print(header)
    for n, total, w, read, rows, peak in lines:
        print(f"{n:>6} {total / mib:>9.1f} {w:>2} {np.mean(read) / mib:>14.2f}, {max(read) / mib:>12.2f} "
              f"{np.mean(read) / total:>6.2f} {int(np.mean(rows)):>11} {peak / mib:>19.1f} {total / mib:>22.1f} "
              f"{total / mib:>19.1f}")


if __name__ == "__main__":
    main()
