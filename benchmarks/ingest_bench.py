"""Ingest throughput (rows/s) and the driver's peak memory as the manifest grows, side by side.

Each size runs in a fresh driver process (so peaks do not carry over) on the same local Ray
settings. The manifest is a JSONL of unique ids whose rows share a few small images by path, so
the cost measured is ingest's own per-row work (read, number, validate, find duplicates, write),
not image decoding. The driver must hold nothing per row: its peak memory should stay roughly
flat while rows/s stays roughly constant.

    python benchmarks/ingest_bench.py                       # 100k and 1M rows
    python benchmarks/ingest_bench.py --rows 100000 300000  # a smaller machine

Columns: rows, wall seconds of run_ingest, rows/s, the driver's peak RSS (whole process, incl.
Ray's core worker; ``ru_maxrss``) and how much of it run_ingest added. (tracemalloc is not used:
it crashes with Ray's threads.)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DUPLICATE_EVERY = 1000  # one duplicate id per this many rows, so the duplicate path does real work


def write_manifest(folder: Path, rows: int, images: int = 8) -> Path:
    """``rows`` JSONL records over ``images`` shared 16x16 PNGs; every DUPLICATE_EVERY-th id repeats."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (30 * i % 256, 80, 200)).save(buffer, "PNG")
        (folder / f"img{i}.png").write_bytes(buffer.getvalue())
    path = folder / "manifest.jsonl"
    with open(path, "w") as handle:
        for i in range(rows):
            record_id = f"{i - 1:08d}" if i % DUPLICATE_EVERY == 0 and i else f"{i:08d}"
            handle.write(json.dumps({"id": record_id, "image": f"img{i % images}.png",
                                     "text": f"post number {i} about a sunny day #Fun"}) + "\n")
    return path


def run_one(rows: int, num_cpus: int, workdir: str) -> dict:
    """In this (fresh) process: build the manifest, start Ray, time run_ingest; memory figures."""
    import ray

    from pacl_ray.config import RunConfig
    from pacl_ray.stages.ingest import run_ingest

    manifest = write_manifest(Path(workdir) / "data", rows)
    ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    cfg = RunConfig(output_dir=str(Path(workdir) / "runs"))
    cfg.ingest.manifest = str(manifest)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    out = run_ingest(cfg)
    seconds = time.perf_counter() - start
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = json.loads((Path(out.uri) / "_SUCCESS").read_text())
    ray.shutdown()
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "rss_peak_mib": rss_peak,
            "rss_growth_mib": rss_peak - rss_before,
            "pairs": summary["pairs"], "duplicates": summary["quarantine_reasons"].get("duplicate_id", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.num_cpus, args.workdir)))
        return
    print(f"ingest, JSONL manifest, small images shared by path, {args.num_cpus} CPUs for Ray", flush=True)
    print(f"{'rows':>10} {'seconds':>9} {'rows/s':>9} {'driver peak RSS':>16} {'growth in run_ingest':>21}", flush=True)
    for rows in args.rows:  # each row printed as soon as it is measured
        with tempfile.TemporaryDirectory(prefix="ingest_bench_") as workdir:
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(rows), "--num-cpus", str(args.num_cpus), "--workdir", workdir],
                check=True, stdout=subprocess.PIPE, text=True,
            )
        r = json.loads(done.stdout.strip().splitlines()[-1])
        expected_dups = (rows - 1) // DUPLICATE_EVERY
        assert (r["pairs"], r["duplicates"]) == (rows - expected_dups, expected_dups), r
        print(f"{r['rows']:>10} {r['seconds']:>9.1f} {r['rows_per_s']:>9.0f} {r['rss_peak_mib']:>12.0f} MiB "
              f"{r['rss_growth_mib']:>17.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
