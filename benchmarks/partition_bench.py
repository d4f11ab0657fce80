"""Pairs/s of the Ray Data scoring pipeline next to a plain single-process loop, from one run.

Both paths score the same ingested pairs with the same UDFs (pacl_ray.stages.scoring.ClipScorer and
SentimentScorer) and include model loading, since a scoring job pays it once either way:

    python benchmarks/partition_bench.py                          # 300 pairs, tiny CLIP + MiniLM
    python benchmarks/partition_bench.py --pairs 2000 --clip-model ViT-B-32 --clip-pretrained openai \\
        --sentiment-model finiteautomata/bertweet-base-sentiment-analysis --sentiment-pooling cls

The same generator writes manifests for trying the CLI, optionally with planted bad records:

    python benchmarks/partition_bench.py --write-manifest /tmp/m --pairs 1500 --plant-bad
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

WORDS = {
    "pos": ["happy", "lovely", "sunny", "beautiful", "amazing", "cute", "joyful", "peaceful"],
    "neg": ["sad", "gloomy", "awful", "lonely", "scary", "broken", "angry", "grey"],
    "noun": ["dog", "beach", "sky", "city", "flowers", "cake", "street", "forest", "party"],
}
# Planted bad records: reason -> how many (the CSV manifest can hold undecodable bytes).
PLANTED_BAD = {
    "missing_file": 7, "unreadable_file": 3, "zero_size_image": 5, "corrupt_image": 6,
    "truncated_image": 4, "decompression_bomb": 2, "empty_text": 8, "undecodable_text": 4,
    "duplicate_id": 6, "missing_field": 2, "bad_value": 2,
}
CONVERTED = {"CMYK": 5, "L": 5, "P": 5, "RGBA": 5, "LA": 3}


def _post(rng: np.random.Generator, i: int) -> str:
    mood = "pos" if i % 2 else "neg"
    adj, noun = rng.choice(WORDS[mood]), rng.choice(WORDS["noun"])
    extras = ["", " #" + str(adj).capitalize() + "Day", " https://t.co/x" + str(i), " @friend" + str(i)]
    return f"what a {adj} {noun}, can't stop looking{extras[i % 4]}"


def _image(rng: np.random.Generator, mode: str = "RGB", size: int = 48) -> bytes:
    from PIL import Image

    pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG" if mode in ("RGB", "CMYK") else "PNG")
    return buffer.getvalue()


def make_manifest(directory: Path, n: int, seed: int = 0, plant_bad: bool = False) -> tuple[Path, dict]:
    """Write ``n`` good image-text pairs (and the PLANTED_BAD records) as a CSV manifest.

    Returns (manifest path, expected quarantine counts per reason). Good rows carry a random
    ``planted_partition`` so the partition report's agreement table has something to show.
    """
    rng = np.random.default_rng(seed)
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows: list[tuple] = []  # (id, image, text bytes, extra columns)

    modes = [m for m, k in CONVERTED.items() for _ in range(k)] if plant_bad else []
    for i in range(n):
        mode = modes[i] if i < len(modes) else "RGB"
        name = f"{i:06d}.{'jpg' if mode in ('RGB', 'CMYK') else 'png'}"
        (images / name).write_bytes(_image(rng, mode))
        rows.append((f"p{i:06d}", f"images/{name}", _post(rng, i).encode(), str(int(rng.integers(1, 5))), ""))
    if plant_bad:
        good_jpeg = _image(rng)
        bad_files = {
            "zero_size_image": lambda: b"",
            "corrupt_image": lambda: rng.bytes(500),
            "truncated_image": lambda: _image(rng, size=96)[:600],
        }
        for reason, make in bad_files.items():
            for k in range(PLANTED_BAD[reason]):
                (images / f"{reason}{k}.jpg").write_bytes(make())
                rows.append((f"{reason}{k}", f"images/{reason}{k}.jpg", b"a post", "", ""))
        for k in range(PLANTED_BAD["missing_file"]):
            rows.append((f"missing{k}", f"images/missing{k}.jpg", b"a post", "", ""))
        for k in range(PLANTED_BAD["unreadable_file"]):
            (images / f"adir{k}.jpg").mkdir(exist_ok=True)
            rows.append((f"adir{k}", f"images/adir{k}.jpg", b"a post", "", ""))
        from PIL import Image

        bomb = images / "bomb.png"  # 9500 x 9500 > Pillow's 89.5M-pixel default, ~0.3 MB on disk
        if not bomb.exists():
            Image.new("L", (9500, 9500)).save(bomb, optimize=True)
        for k in range(PLANTED_BAD["decompression_bomb"]):
            rows.append((f"bomb{k}", "images/bomb.png", b"a post", "", ""))
        (images / "fine.jpg").write_bytes(good_jpeg)
        blank = [b"", b"   ", b"\t", b"https://only.a/link @someone"]
        for k in range(PLANTED_BAD["empty_text"]):
            rows.append((f"empty{k}", "images/fine.jpg", blank[k % len(blank)], "", ""))
        for k in range(PLANTED_BAD["undecodable_text"]):
            rows.append((f"undecodable{k}", "images/fine.jpg", b"caf\xe9 \xff\xfe", "", ""))
        for k in range(PLANTED_BAD["duplicate_id"]):
            rows.append((rows[k][0], rows[k][1], b"reposted", "", ""))
        for k in range(PLANTED_BAD["missing_field"]):
            rows.append((f"noimage{k}", "", b"a post", "", ""))
        for k in range(PLANTED_BAD["bad_value"]):
            rows.append((f"badscore{k}", "images/fine.jpg", b"a post", "", "very high"))
    manifest = directory / "manifest.csv"
    with open(manifest, "wb") as handle:
        handle.write(b"id,image,text,planted_partition,factual_score\n")
        for rid, image, text, planted, factual in rows:
            quoted = b'"' + text.replace(b'"', b'""') + b'"'
            handle.write(b",".join([rid.encode(), image.encode(), quoted, planted.encode(), factual.encode()]) + b"\n")
    return manifest, (dict(PLANTED_BAD) if plant_bad else {})


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--clip-model", default="pacl-tiny-clip")
    parser.add_argument("--clip-pretrained", default="")
    parser.add_argument("--sentiment-model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--sentiment-pooling", default="mean")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-actors", type=int, default=1, help="actors per model in the Ray pipeline, at most "
                        "(the pool autoscales from 1)")
    parser.add_argument("--precision", default="bf16", help="autocast on GPU; CPU runs fp32")
    parser.add_argument("--num-cpus", type=int, default=None, help="local Ray instance CPUs")
    parser.add_argument("--workdir", default="", help="where data and outputs go (default: a temp dir)")
    parser.add_argument("--write-manifest", metavar="DIR", help="only write a manifest to DIR and exit")
    parser.add_argument("--plant-bad", action="store_true", help="with --write-manifest: add bad records")
    args = parser.parse_args(argv)

    if args.write_manifest:
        manifest, expected = make_manifest(Path(args.write_manifest), args.pairs, plant_bad=args.plant_bad)
        print(json.dumps({"manifest": str(manifest), "good_pairs": args.pairs, "expected_quarantine": expected}))
        return 0

    import ray
    import torch

    from pacl_ray.config import RayConfig, RunConfig
    from pacl_ray.stages.ingest import read_pairs_table, run_ingest
    from pacl_ray.stages.scoring import build_scoring_pipeline, load_anp_vocab, score_table_locally
    from pacl_ray.stages.runtime import cluster_gpus, init_ray

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="partition_bench_"))
    manifest, _ = make_manifest(workdir / "data", args.pairs)
    cfg = RunConfig(output_dir=str(workdir / "runs"), ray=RayConfig(num_cpus=args.num_cpus))
    cfg.ingest.manifest = str(manifest)
    p = cfg.partition
    p.clip_model, p.clip_pretrained = args.clip_model, args.clip_pretrained
    p.sentiment_model, p.sentiment_pooling = args.sentiment_model, args.sentiment_pooling
    p.batch_size, p.max_actors, p.precision = args.batch_size, args.max_actors, args.precision
    init_ray(cfg.ray)
    ingest = run_ingest(cfg)
    pairs = read_pairs_table(ingest)
    vocab = load_anp_vocab(p.anp_vocab)

    def ray_pipeline():
        ds = build_scoring_pipeline(ray.data.read_parquet(ingest.path("pairs")), p, vocab, True, True)
        return ds.materialize()

    scored, ray_s = _timed(ray_pipeline)
    assert scored.count() == pairs.num_rows
    local, local_s = _timed(lambda: score_table_locally(pairs, p, vocab, args.batch_size))
    assert local.num_rows == pairs.num_rows
    n = pairs.num_rows
    result = {
        "pairs": n, "clip": f"{args.clip_model}:{args.clip_pretrained or 'random'}",
        "sentiment": args.sentiment_model, "batch_size": args.batch_size, "max_actors": args.max_actors,
        "cluster_cpus": ray.cluster_resources().get("CPU"), "cluster_gpus": cluster_gpus(),
        "torch_threads": torch.get_num_threads(),
        "ray_seconds": round(ray_s, 2), "local_seconds": round(local_s, 2),
        "ray_pairs_per_s": round(n / ray_s, 1), "local_pairs_per_s": round(n / local_s, 1),
        "ray_over_local": round(local_s / ray_s, 3),
    }
    print(json.dumps(result, indent=2))
    print(f"ray data: {result['ray_pairs_per_s']} pairs/s   plain loop: {result['local_pairs_per_s']} pairs/s   "
          f"ratio (ray / loop): {result['ray_over_local']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
