"""Command line: ``pacl-ray <stage> [--config FILE] [--set key=value ...]`` (also ``python -m pacl_ray``).

Every subcommand loads the typed config (:mod:`pacl_ray.config`), applies its own flags as
overrides, starts or joins Ray, and runs its stage plus any upstream stage whose cached output is
missing. ``pacl-ray tune`` is ``python -m pacl_ray.tune``.
"""

from __future__ import annotations

import argparse
import json
import sys

from pacl_ray import config as config_mod

STAGES = ("ingest", "partition", "embed", "cluster", "train", "evaluate", "run", "tune")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (local path or pyarrow URI)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value with a dotted key, e.g. --set train.epochs=30 (repeatable)",
    )
    parser.add_argument("--output-dir", help="where stage outputs go (local path, s3://, gs://)")
    parser.add_argument("--name", help="run name")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacl-ray",
        description="PACL on Ray: partition, cluster, train and evaluate emotion-aware visual backbones.",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    p = sub.add_parser("ingest", help="manifests (JSONL/CSV/Parquet, WebDataset, TumEmo) -> validated table")
    _add_common(p)
    p.add_argument("--manifest", help="manifest file, shard directory or TumEmo folder")
    p.add_argument("--format", choices=["auto", "jsonl", "csv", "parquet", "webdataset", "tumemo"])

    p = sub.add_parser("partition", help="factual/emotional scores and partitions (paper 3.1)")
    _add_common(p)
    p.add_argument("--manifest", help="manifest to ingest first (else ingest.manifest)")
    p.add_argument("--sigma", type=float, help="threshold for both scores")

    p = sub.add_parser("embed", help="initial backbone image features and frozen text features (3.2)")
    _add_common(p)
    p.add_argument("--manifest")

    p = sub.add_parser("cluster", help="k-means pseudo-labels for every K (3.2)")
    _add_common(p)
    p.add_argument("--manifest")
    p.add_argument("--k", help="comma-separated K values, e.g. 2,3,6,10,15,25")

    p = sub.add_parser("train", help="partition-adaptive contrastive training on Ray Train (3.3)")
    _add_common(p)
    p.add_argument("--manifest")

    p = sub.add_parser("evaluate", help="linear probe / fine-tuning / zero-shot on emotion tasks (4.4, 4.5)")
    _add_common(p)
    p.add_argument("--backbone", help="timm name, open_clip:<arch>, or an exported checkpoint")
    p.add_argument("--task", action="append", default=[], help="task spec (repeatable); see pacl_ray.evaluation.evaluate")
    p.add_argument("--protocol", choices=["linear", "finetune", "zeroshot"])

    p = sub.add_parser("run", help="the whole pipeline for one config, then evaluation")
    _add_common(p)
    p.add_argument("--manifest")

    sub.add_parser("tune", help="Ray Tune sweeps (python -m pacl_ray.tune --help)", add_help=False)
    return parser


def _overrides_from_flags(args: argparse.Namespace) -> list[str]:
    sets: list[str] = []
    flag_keys = {
        "output_dir": "output_dir", "name": "name", "manifest": "ingest.manifest",
        "format": "ingest.format", "sigma": "partition.sigma", "protocol": "evaluate.protocol",
    }
    for attr, key in flag_keys.items():
        value = getattr(args, attr, None)
        if value is not None:
            sets.append(f"{key}={json.dumps(value)}")
    if getattr(args, "k", None):
        ks = [int(k) for k in args.k.split(",") if k.strip()]
        sets.append(f"cluster.ks={json.dumps(ks)}")
    if getattr(args, "task", None):
        sets.append(f"evaluate.tasks={json.dumps(args.task)}")
    return sets


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "tune":
        from pacl_ray.sweeps.driver import main as tune_main

        return tune_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        cfg = config_mod.load_config(args.config, _overrides_from_flags(args) + args.overrides)
    except config_mod.ConfigError as err:
        print(f"pacl-ray: config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_mod.dump_config(cfg))
        return 0

    try:
        return _run_stage(args, cfg)
    except _user_errors() as err:
        # Bad input, not a bug: the message names the file, row and field; no traceback.
        print(f"pacl-ray {args.stage}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's data or settings, reported without a traceback."""
    from pacl_ray.evaluation.datasets import DatasetError
    from pacl_ray.evaluation.evaluate import ExportError, TaskSpecError
    from pacl_ray.stages.ingest import IngestError
    from pacl_ray.core.kmeans import NotEnoughPointsError
    from pacl_ray.stages.pseudo_labels import NonFiniteFeaturesError

    return (config_mod.ConfigError, IngestError, NotEnoughPointsError, NonFiniteFeaturesError, DatasetError,
            TaskSpecError, ExportError, FileNotFoundError)


def format_train_result(result) -> str:
    """A training run in a few lines: where it is, what it exported, the loss per epoch."""
    lines = [f"train: {result.uri}{' (cached)' if result.cached else ''}",
             f"  backbone: {result.backbone_checkpoint}", f"  heads:    {result.heads_checkpoint}",
             "  epoch  partitions  steps  L1      L2      L3      L4      total   samples/s"]
    for row in result.history:
        lines.append(f"  {row['epoch']:>5}  {row['phase']:>10}  {row['steps']:>5}  " + "  ".join(
            f"{row[k]:6.3f}" for k in ("L1", "L2", "L3", "L4", "total")) + f"  {row.get('samples_per_s', float('nan')):9.1f}")
    return "\n".join(lines)


def _run_stage(args: argparse.Namespace, cfg: config_mod.RunConfig) -> int:
    from pacl_ray.stages import pipeline
    from pacl_ray.stages.runtime import init_ray

    init_ray(cfg.ray)
    if args.stage == "ingest":
        out = pipeline.stage_ingest(cfg)
    elif args.stage == "partition":
        out = pipeline.stage_partition(cfg)
    elif args.stage == "embed":
        out = pipeline.stage_embed(cfg)
    elif args.stage == "cluster":
        out = pipeline.stage_cluster(cfg)
    elif args.stage == "train":
        out = pipeline.stage_train(cfg)
        print(format_train_result(out))
        return 0
    elif args.stage == "evaluate":
        from pacl_ray.evaluation.evaluate import main as evaluate_main

        return evaluate_main(cfg, backbone=args.backbone)
    else:  # run: the whole pipeline, then the export against its initial weights
        out = pipeline.stage_train(cfg)
        print(f"train: {out.uri} (exported {out.backbone_checkpoint})")
        if not cfg.evaluate.tasks:
            print("run: no evaluate.tasks set; skipping evaluation")
            return 0
        from pacl_ray.evaluation.evaluate import main as evaluate_main

        return evaluate_main(cfg, backbone=out.backbone_checkpoint.rsplit("/", 1)[0])
    print(f"{args.stage}: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
