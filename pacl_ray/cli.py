"""The one command line: ``pacl-ray COMMAND ...`` (also ``python -m pacl_ray``).

Every entry point is a subcommand of this one parser: the stages (``ingest``, ``partition``,
``embed``, ``cluster``, ``train``), ``evaluate``, ``run`` (the whole pipeline), ``tune`` (Ray Tune
sweeps; ``python -m pacl_ray.tune`` is ``pacl-ray tune``), ``world`` (the embedded synthetic
world; ``python -m pacl_ray.world`` is ``pacl-ray world``) and ``config`` (every config key with
its type, default, allowed values and meaning, generated from :mod:`pacl_ray.config`).

A stage subcommand loads the typed config, applies its own flags as overrides, checks that the
output directory can be written, starts or joins Ray, and runs its stage plus any upstream stage
whose cached output is missing.

Exit status: 0 done; 1 a sweep trial failed; 2 a user error (bad config value, missing or
unreadable input, unwritable output directory, bad dataset or task), reported in one line on
stderr without a traceback; 130 interrupted (Ctrl-C, SIGINT) and 143 stopped (SIGTERM: ``timeout``,
``docker stop``, Slurm, ``ray job stop``), either with what was kept and the command that resumes.
A sweep stopped while its trials run says how many finished; its results.md is marked INCOMPLETE
and it writes no best_config.yaml. Further signals while it shuts down are ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from typing import Any, Callable

from pacl_ray import __version__
from pacl_ray import config as config_mod
from pacl_ray.stages.runtime import (
    RayStartError, exit_within, ignore_stop_signals, install_stop_handlers, stop_signal,
)

STAGES = ("ingest", "partition", "embed", "cluster", "train", "evaluate", "run")
COMMANDS = (*STAGES, "tune", "world", "config")
WORLD_SIZES = ("default", "tiny")  # pacl_ray.world.build.SIZES, named here so --help imports no torch

MANIFEST_HELP = ("image-text pairs to ingest first: JSONL/CSV/Parquet file, WebDataset shard directory "
                 "or glob, or TumEmo folder (sets ingest.manifest)")


class _Formatter(argparse.HelpFormatter):
    """Wraps descriptions; keeps the line breaks of the examples (an epilog starting "example")."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


# --------------------------------------------------------------------------- the parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (local path or pyarrow URI)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value with a dotted key, e.g. --set train.epochs=30, a list as "
             "--set cluster.ks=[2,3] (repeatable; `pacl-ray config` lists every key and its type)",
    )
    parser.add_argument("--output-dir", help="where stage outputs go: local path, s3://, gs:// (sets output_dir)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _command(sub: Any, name: str, summary: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
    epilog = "example:\n" + "\n".join(f"  {e}" for e in examples)
    _COMMAND_PARSERS[name] = sub.add_parser(name, help=summary, description=description, epilog=epilog,
                                            formatter_class=_Formatter)
    return _COMMAND_PARSERS[name]


_COMMAND_PARSERS: dict[str, argparse.ArgumentParser] = {}  # filled by build_parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed; an unknown flag is reported with its command's usage (``pacl-ray tune
    --epochs 3``: tune's flags), not the top-level one, exit 2."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _COMMAND_PARSERS[args.command].error(f"unrecognized arguments: {' '.join(unknown)} "
                                        f"(config values: --set KEY=VALUE, e.g. --set train.epochs=3)")
    return args


def build_parser() -> argparse.ArgumentParser:
    """``pacl-ray`` with every entry point as a subcommand."""
    parser = argparse.ArgumentParser(
        prog="pacl-ray",
        description="PACL on Ray: partition, cluster, train and evaluate emotion-aware visual backbones "
                    "(Partitioned Adaptive Contrastive Learning, ACM MM 2024).",
        epilog="example:\n  pacl-ray tune                       # the default sweep on the embedded world\n"
               "  pacl-ray train --manifest pairs.jsonl --set train.epochs=30\n"
               "  pacl-ray COMMAND --help",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of these (pacl-ray COMMAND --help: its flags and an example)")

    p = _command(sub, "ingest", "manifests (JSONL/CSV/Parquet, WebDataset, TumEmo) -> validated table",
                 "Stage 0: read image-text pairs, drop bad records (each reason counted) and write one "
                 "validated table under {output_dir}/stages/ingest.",
                 ["pacl-ray ingest --manifest pairs.jsonl --output-dir runs/"])
    _add_common(p)
    p.add_argument("--manifest", help=MANIFEST_HELP.replace(" to ingest first", ""))
    p.add_argument("--format", choices=config_mod.INGEST_FORMATS,
                   help="manifest format; auto = by file name (sets ingest.format)")

    p = _command(sub, "partition", "factual/emotional scores and partitions (paper 3.1)",
                 "Stage 1 (paper 3.1): score every pair's factual (CLIP) and emotional (ANP vs text "
                 "sentiment) match and split the pairs into strong-coupled, partial and weak-coupled "
                 "partitions at threshold sigma.",
                 ["pacl-ray partition --manifest pairs.jsonl --sigma 0.7"])
    _add_common(p)
    p.add_argument("--manifest", help=MANIFEST_HELP)
    p.add_argument("--sigma", type=float, help="threshold of both calibrated scores, in [0, 1] (sets partition.sigma)")

    p = _command(sub, "embed", "initial backbone image features and frozen text features (3.2)",
                 "Stage 2a (paper 3.2): image features of the initial backbone and features of the "
                 "frozen text encoder, for k-means and training.",
                 ["pacl-ray embed --manifest pairs.jsonl --set model.backbone=resnet50"])
    _add_common(p)
    p.add_argument("--manifest", help=MANIFEST_HELP)

    p = _command(sub, "cluster", "k-means pseudo-labels for every K (3.2)",
                 "Stage 2b (paper 3.2): k-means pseudo-labels of the image and text features for every "
                 "K, in one pass.",
                 ["pacl-ray cluster --manifest pairs.jsonl --k 2,3,6,10,15,25"])
    _add_common(p)
    p.add_argument("--manifest", help=MANIFEST_HELP)
    p.add_argument("--k", help="comma-separated K values, each >= 1, e.g. 2,3,6,10,15,25 (sets cluster.ks)")

    p = _command(sub, "train", "partition-adaptive contrastive training on Ray Train (3.3)",
                 "Stage 3 (paper 3.3): train the backbone and projection heads with the partition-"
                 "adaptive contrastive loss on Ray Train, and export the trained backbone. Runs any "
                 "upstream stage whose cached output is missing.",
                 ["pacl-ray train --manifest pairs.jsonl --set train.epochs=30 --set partition.sigma=0.5"])
    _add_common(p)
    p.add_argument("--manifest", help=MANIFEST_HELP)

    p = _command(sub, "evaluate", "linear probe / fine-tuning / zero-shot on emotion tasks (4.4, 4.5)",
                 "Downstream evaluation (paper 4.4, 4.5): a backbone (a timm/open_clip name or a PACL "
                 "export) on emotion tasks by linear probe, fine-tuning or zero-shot.",
                 ["pacl-ray evaluate --backbone runs/stages/train/<key>/export --task single:fi=/data/FI "
                  "--protocol linear"])
    _add_common(p)
    p.add_argument("--backbone", help="timm name, open_clip:<arch>, or an exported PACL checkpoint directory")
    p.add_argument("--task", action="append", default=[], metavar="TASKSPEC",
                   help="task spec, e.g. single:fi=/data/FI (repeatable; see pacl_ray.evaluation.tasks; "
                        "sets evaluate.tasks)")
    p.add_argument("--protocol", help="linear, finetune or zeroshot; several comma-separated (sets evaluate.protocol)")

    p = _command(sub, "run", "the whole pipeline for one config, then evaluation",
                 "Every stage for one config (ingest, partition, embed, cluster, train), then the "
                 "exported backbone's evaluation on evaluate.tasks against its initial weights.",
                 ["pacl-ray run --config my.yaml --manifest pairs.jsonl --set evaluate.tasks='[single:fi=/data/FI]'"])
    _add_common(p)
    p.add_argument("--manifest", help=MANIFEST_HELP)

    p = _command(sub, "tune", "Ray Tune sweeps (paper Table 5); `python -m pacl_ray.tune`",
                 "Ray Tune sweeps of PACL (paper Table 5). With no arguments: the default sweep on the "
                 "embedded synthetic world (no network, no GPU needed). An interrupted sweep of the "
                 "same name resumes: finished trials are kept.",
                 ["pacl-ray tune", "pacl-ray tune --space table5 --data pairs.jsonl --downstream single:fi=/data/FI "
                  "--output-dir s3://bucket/pacl-ray"])
    p.add_argument("--space", default="default",
                   help="space file or name in tune_spaces/ (default: %(default)s)")
    p.add_argument("--data", help="manifest of real image-text pairs (sets ingest.manifest); "
                   "the paper's models become the defaults")
    p.add_argument("--downstream", action="append", default=[], metavar="TASKSPEC",
                   help="downstream task spec for evaluation (repeatable; see pacl_ray.evaluation.tasks)")
    p.add_argument("--name", help="sweep name: its outputs go to {output_dir}/sweeps/NAME "
                   "(default: the space file's name)")
    p.add_argument("--output-dir", help="where stage outputs and sweeps go (path, s3://, gs://)")
    p.add_argument("--config", metavar="FILE", help="base YAML config under the space's fixed settings")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5, a list as --set cluster.ks=[2,3] "
                        "(repeatable)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="restore an interrupted sweep of the same name (default: on)")
    p.add_argument("--max-concurrent", type=int, default=0,
                   help="trials at once (default: as many as the cluster's resources fit)")
    p.add_argument("--world", choices=WORLD_SIZES, default="default",
                   help="size of the embedded world used when no --data is given")
    p.add_argument("--world-dir", help="cache directory of the embedded world")
    p.add_argument("--world-seed", type=int, default=0,
                   help="seed of the embedded world (another seed: another world, to check that an "
                        "effect is not one world's accident)")

    p = _command(sub, "world", "build the embedded synthetic world; `python -m pacl_ray.world`",
                 "Build (once; later runs reuse it) the embedded synthetic affective world that the "
                 "default sweep trains on, and print its report: the affective gap and the planted "
                 "partitions.",
                 ["pacl-ray world --size tiny --seed 1"])
    p.add_argument("--size", default="default", choices=WORLD_SIZES, help="world size (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="world seed (default: %(default)s)")
    p.add_argument("--cache-dir", default=None,
                   help="where worlds are cached (default: $PACL_RAY_CACHE/world or ~/.cache/pacl_ray/world)")

    p = _command(sub, "config", "every config key: type, default, allowed values, meaning",
                 "List every config key with its type, default, allowed values and one-line meaning "
                 "(paper section or SPEC choice), from pacl_ray/config.py.",
                 ["pacl-ray config", "pacl-ray config train.temperature partition"])
    p.add_argument("keys", nargs="*", metavar="KEY",
                   help="only these keys or sections (prefixes of dotted keys), e.g. train or partition.sigma")
    return parser


# --------------------------------------------------------------------------- commands


def _overrides_from_flags(args: argparse.Namespace) -> list[str]:
    sets: list[str] = []
    flag_keys = {
        "output_dir": "output_dir", "manifest": "ingest.manifest", "format": "ingest.format",
        "sigma": "partition.sigma", "protocol": "evaluate.protocol",
    }
    for attr, key in flag_keys.items():
        value = getattr(args, attr, None)
        if value is not None:
            sets.append(f"{key}={json.dumps(value)}")
    if getattr(args, "k", None):
        try:
            ks = [int(k) for k in args.k.split(",") if k.strip()]
        except ValueError:
            raise config_mod.ConfigError(f"--k {args.k!r}: expected comma-separated integers like 2,3,6") from None
        sets.append(f"cluster.ks={json.dumps(ks)}")
    if getattr(args, "task", None):
        sets.append(f"evaluate.tasks={json.dumps(args.task)}")
    return sets


def _check_inputs(cfg: config_mod.RunConfig, command: str) -> None:
    """Input files that must exist before any work starts (a glob or URI is left to the stage)."""
    manifest = cfg.ingest.manifest
    if command != "evaluate" and not manifest.strip():  # every stage reads the ingested pairs
        raise config_mod.ConfigError("ingest.manifest is empty: pass --manifest FILE (or set ingest.manifest)")
    if command != "evaluate" and manifest and "://" not in manifest and not any(c in manifest for c in "*?["):
        path = os.path.expanduser(manifest)
        if not os.path.exists(path):
            raise config_mod.ConfigError(f"ingest.manifest={manifest!r}: no such file or directory")
        if not os.access(path, os.R_OK):
            raise config_mod.ConfigError(f"ingest.manifest={manifest!r}: not readable (permission denied)")


class _Interrupt:
    """What a Ctrl-C leaves behind, filled in as soon as a command knows it."""

    kept = ""


def _stage_command(args: argparse.Namespace) -> int:
    cfg = config_mod.load_config(args.config, _overrides_from_flags(args) + args.overrides)
    if args.print_config:
        print(config_mod.dump_config(cfg))
        return 0
    _check_inputs(cfg, args.command)
    output_dir = config_mod.check_output_dir(cfg.output_dir)
    _Interrupt.kept = (f"every finished stage output and the last training checkpoint are kept under "
                       f"{output_dir} (stage outputs are reused by content, training resumes from its checkpoint)")
    return _run_stage(args, cfg)


def _tune_command(args: argparse.Namespace) -> int:
    from pacl_ray.sweeps import driver

    _Interrupt.kept = "nothing of the sweep yet (shared stage outputs already finished are kept)"

    def kept(sweep_dir: str) -> None:
        _Interrupt.kept = (f"finished trials with their exports, the trials' last checkpoints and every finished "
                           f"stage output are kept under {sweep_dir} and its output directory (the relaunch "
                           f"restores the sweep)")
    return driver.run_tune(
        args.space, data=args.data, downstream=args.downstream, name=args.name, output_dir=args.output_dir,
        config=args.config, overrides=args.overrides, resume=args.resume, max_concurrent=args.max_concurrent,
        world=args.world, world_dir=args.world_dir, world_seed=args.world_seed, on_sweep_dir=kept,
    )


def _world_command(args: argparse.Namespace) -> int:
    if args.cache_dir:
        config_mod.check_output_dir(args.cache_dir, key="--cache-dir")
    _Interrupt.kept = "nothing of an unfinished world (a partial world directory is rebuilt on the next run)"
    from pacl_ray.world.build import run_world

    return run_world(args.cache_dir, seed=args.seed, size=args.size)


def _config_command(args: argparse.Namespace) -> int:
    fields = config_mod.describe_fields()
    if args.keys:
        fields = [f for f in fields if any(f.key == k or f.key.startswith(f"{k}.") for k in args.keys)]
        if not fields:
            known = sorted({f.key.split(".")[0] for f in config_mod.describe_fields()})
            raise config_mod.ConfigError(f"no config key matches {' '.join(args.keys)}; sections: {', '.join(known)}")
    print(config_mod.format_fields(fields))
    return 0


COMMAND_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    **{stage: _stage_command for stage in STAGES},
    "tune": _tune_command, "world": _world_command, "config": _config_command,
}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's data or settings, reported in one line without a traceback."""
    from pacl_ray.core.backbones import ModelLoadError
    from pacl_ray.core.kmeans import NotEnoughPointsError
    from pacl_ray.evaluation.datasets import DatasetError
    from pacl_ray.evaluation.tasks import TaskSpecError
    from pacl_ray.formats.export import ExportError
    from pacl_ray.stages.ingest import IngestError
    from pacl_ray.sweeps.spaces import SpaceError
    from pacl_ray.stages.pseudo_labels import NonFiniteFeaturesError
    from pacl_ray.stages.train import NonFiniteLossError, NoTrainableEpochError

    return (config_mod.ConfigError, SpaceError, IngestError, NotEnoughPointsError, DatasetError,
            NonFiniteFeaturesError, NonFiniteLossError, NoTrainableEpochError,
            TaskSpecError, ExportError, ModelLoadError, FileNotFoundError, PermissionError, IsADirectoryError,
            NotADirectoryError)


def _one_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    _Interrupt.kept = ""
    install_stop_handlers(reset=True)  # SIGTERM like Ctrl-C (again after ray.init, which replaces it)
    try:
        return COMMAND_HANDLERS[args.command](args)
    except KeyboardInterrupt as err:
        received = stop_signal()  # 0: a KeyboardInterrupt raised in this process, not a signal
        if received:
            ignore_stop_signals()  # a second Ctrl-C must not break Ray's shutdown into a traceback
        signum = received or signal.SIGINT
        kept = _Interrupt.kept or "nothing yet (it stopped before any work started)"
        detail = f" ({err})" if str(err) else ""  # a sweep: how many trials finished
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"\npacl-ray {args.command}: {how}{detail}; {kept}.\n"
              f"resume with: {shlex.join(['pacl-ray', *argv])}", file=sys.stderr, flush=True)
        if received:
            exit_within(128 + int(signum))  # Ray's shutdown waits for a GCS that SIGTERM may have killed
        return 128 + int(signum)
    except _user_errors() as err:
        # Bad input, not a bug: the message names the file, row and field (or the config key,
        # value and what is allowed); no traceback.
        print(f"pacl-ray {args.command}: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        return 2
    except RayStartError as err:
        # The machine, not the input: one line with what Ray said and what to try (exit 1).
        print(f"pacl-ray {args.command}: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        return 1


VAL_METRIC = "val_acc"  # pacl_ray.stages.validation.VAL_METRIC (percent), named here so --help imports no torch


def format_train_result(result) -> str:
    """A training run in a few lines: where it is, what it exported, the loss per epoch, and the
    held-out validation probe's accuracy (``val_acc``, percent) when the run had one."""
    validated = any(VAL_METRIC in row for row in result.history)
    lines = [f"train: {result.uri}{' (cached)' if result.cached else ''}",
             f"  backbone: {result.backbone_checkpoint}", f"  heads:    {result.heads_checkpoint}",
             "  epoch  partitions  steps  L1      L2      L3      L4      total   samples/s"
             + ("  val_acc" if validated else "")]
    for row in result.history:
        line = f"  {row['epoch']:>5}  {row['phase']:>10}  {row['steps']:>5}  " + "  ".join(
            f"{row[k]:6.3f}" for k in ("L1", "L2", "L3", "L4", "total")) + f"  {row.get('samples_per_s', float('nan')):9.1f}"
        if validated:
            line += f"  {row[VAL_METRIC]:7.1f}" if VAL_METRIC in row else f"  {'-':>7}"
        lines.append(line)
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_stage_output(out) -> str:
    """A finished stage (a :class:`pacl_ray.stages.cache.StageOutput`) in a few lines: whether this
    command wrote it or reused the cached one, where it is (credentials redacted), and its files
    (a folder as one entry: its file count and total size), wrapped at 100 columns."""
    from pacl_ray.formats.storage import redact

    state = "cached, nothing recomputed" if out.cached else "written"
    lines = [f"{out.stage}: {state}: {redact(out.uri)}"]
    groups: dict[str, list[int]] = {}
    for rel, (size, _) in sorted((out.files or {}).items()):
        top, sep, _ = rel.partition("/")
        groups.setdefault(top + sep, []).append(size)
    entries = [f"{name} ({len(sizes)} file{'s' if len(sizes) != 1 else ''}, {_size(sum(sizes))})"
               if name.endswith("/") else f"{name} ({_size(sizes[0])})" for name, sizes in groups.items()]
    line = "  files:"
    for i, entry in enumerate(entries):
        text = f" {entry}" + ("," if i < len(entries) - 1 else "")
        if len(line) + len(text) > 100 and line.strip() != "files:":
            lines.append(line)
            line = "        "  # under the first entry
        line += text
    if entries:
        lines.append(line)
    return "\n".join(lines)


def _run_stage(args: argparse.Namespace, cfg: config_mod.RunConfig) -> int:
    from pacl_ray.stages import pipeline
    from pacl_ray.stages.runtime import init_ray

    if args.command == "evaluate":
        from pacl_ray.evaluation.evaluate import main as evaluate_main

        return evaluate_main(cfg, backbone=args.backbone)
    if args.command in ("train", "run"):
        from pacl_ray.evaluation.validation_set import load_validation_set

        validation = load_validation_set(cfg)  # None unless validation.every_epochs > 0
    init_ray(cfg.ray)
    if args.command == "ingest":
        out = pipeline.stage_ingest(cfg)
    elif args.command == "partition":
        out = pipeline.stage_partition(cfg)
    elif args.command == "embed":
        out = pipeline.stage_embed(cfg)
    elif args.command == "cluster":
        out = pipeline.stage_cluster(cfg)
    elif args.command == "train":
        out = pipeline.stage_train(cfg, validation=validation)
        print(format_train_result(out))
        return 0
    else:  # run: the whole pipeline, then the export against its initial weights
        out = pipeline.stage_train(cfg, validation=validation)
        print(f"train: {out.uri} (exported {out.backbone_checkpoint})")
        if not cfg.evaluate.tasks:
            print("run: no evaluate.tasks set; skipping evaluation")
            return 0
        from pacl_ray.evaluation.evaluate import main as evaluate_main

        return evaluate_main(cfg, backbone=out.backbone_checkpoint.rsplit("/", 1)[0])
    print(format_stage_output(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
