"""Sweeps: ``python -m pacl_ray.tune [--space FILE] [--data MANIFEST --downstream TASK ...]``.

With no arguments this runs ``tune_spaces/default.yaml`` on the embedded synthetic world
(:mod:`pacl_ray.world.build`) and prints the world's affective gap, the initial backbone's downstream
accuracy, the sweep table (with the vanilla contrastive baseline) and the best config.

How a sweep runs:

1. The space file (:mod:`pacl_ray.sweeps.spaces`) is expanded into a fixed list of trials.
2. The upstream stages that trials share run once, here on the driver: ingest, scoring (one pass
   for every sigma: the scores' content key excludes sigma), embedding, and k-means for the union
   of every K in the sweep in one pass (``cluster.ks``). Stage outputs are content-keyed, so
   trials find them in the cache and only threshold, train and evaluate.
3. Ray Tune runs one function trainable per trial (Ray's Train-inside-Tune pattern): it calls the
   training stage, which builds and fits a ``TorchTrainer`` with its own workers (a trial of one
   CPU worker and no ASHA trains in the trial process instead: two process starts fewer,
   :mod:`pacl_ray.stages.train_launch`), then evaluates the exported backbone on the downstream
   tasks and reports the metrics, and the seconds from the trial's start to its first training
   step, with ``ray.tune.report``.
4. The experiment lives under ``{output_dir}/sweeps/<name>/tune``; relaunching the same sweep
   restores it (finished trials are kept, unfinished and errored ones re-run, and the training
   stage resumes from its own checkpoint).
5. Outputs under ``{output_dir}/sweeps/<name>/``: ``results.md`` and ``results.csv`` (the layout
   of the paper's Table 5, plus each trial's start-to-first-step seconds), ``plot_<key>.png`` per searched key, ``best_config.yaml``, and
   ``trials.json`` with each trial's metrics and exported backbone.
6. Interrupted (Ctrl-C or SIGTERM while trials run): Tune saves the experiment's state and stops the
   running trials (a first Ctrl-C; :class:`TuneInterruptWatch`), or the run stops at once (SIGTERM,
   :func:`pacl_ray.stages.runtime.install_stop_handlers`). Trials it stopped are ``interrupted``,
   never "failed"; ``results.md`` then starts with ``INCOMPLETE: interrupted, N of M trials
   finished`` (``results.csv`` and ``trials.json`` say so too), no best config is chosen and no
   ``best_config.yaml`` is written (one from an earlier run of the sweep is removed), and
   :class:`SweepInterrupted` reaches the command line: exit 130 (SIGINT) or 143 (SIGTERM) with
   the command that resumes. (SIGTERM stops before the report is written: nothing is written.)
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

from pacl_ray.stages import cache
from pacl_ray.formats import storage
from pacl_ray import config as config_mod
from pacl_ray.sweeps.report import SweepReport, TrialOutcome, write_report
from pacl_ray.sweeps.spaces import (
    SpaceError, SweepSpace, Trial, check_asha, check_metric, expand_trials, format_value, get_dotted, load_space,
)

DEFAULT_SPACE = "default"
REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALLED_SPACES_ROOT = Path(sys.prefix) / "share" / "pacl_ray"  # pip install . puts tune_spaces/ here


# --------------------------------------------------------------------------- space files


def resolve_space_path(name: str, cwd: str | None = None) -> str:
    """A space given as a path, a file in ``tune_spaces/``, or a bare name like ``table5_sigma``.

    Looked up relative to the working directory first, then to the repository root beside the
    package (a source checkout), then to ``{sys.prefix}/share/pacl_ray`` where ``pip install``
    puts the shipped ``tune_spaces/`` (pyproject's data-files)."""
    if "://" in name:
        return name
    candidates = [name]
    if not name.endswith((".yaml", ".yml")):
        candidates.append(f"{name}.yaml")
    candidates += [os.path.join("tune_spaces", c) for c in list(candidates) if os.sep not in c and "/" not in c]
    roots = [Path(cwd or os.getcwd()), REPO_ROOT, INSTALLED_SPACES_ROOT]
    for root in roots:
        for candidate in candidates:
            path = Path(candidate).expanduser()
            path = path if path.is_absolute() else root / path
            if path.is_file():
                return str(path)
    raise SpaceError(space_not_found(name, roots))


def space_names(roots: list[Path]) -> list[str]:
    """The names of the space files in ``tune_spaces/`` under each of ``roots``, sorted."""
    names = set()
    for root in roots:
        folder = root / "tune_spaces"
        if folder.is_dir():
            names.update(p.stem for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    return sorted(names)


def space_not_found(name: str, roots: list[Path]) -> str:
    """One line: ``name`` is neither a file nor a space name, the names there are (with close matches)
    and that a path to a YAML file works too."""
    import difflib

    names = space_names(roots)
    stem = Path(name).name.removesuffix(".yaml").removesuffix(".yml")
    guess = difflib.get_close_matches(stem, names, n=2, cutoff=0.6)
    kind = "space file" if os.sep in name or "/" in name or name.endswith((".yaml", ".yml")) else "space"
    return (f"{kind} {name!r} not found; " + (f"did you mean {' or '.join(guess)}? " if guess else "")
            + f"names in tune_spaces/: {', '.join(names) or '(none)'}; or a path to a YAML file")


# --------------------------------------------------------------------------- configs


def base_config_dict(
    space: SweepSpace,
    *,
    world_overrides: dict | None = None,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    data: str | None = None,
    downstream: list[str] | None = None,
    output_dir: str | None = None,
) -> dict:
    """The sweep's base config, nested and validated (by :func:`pacl_ray.config.layer_config`).
    Later layers win: config defaults, the embedded world's settings, ``--config``, the space's
    ``fixed``/``downstream``, ``--set``, then ``--data``/``--downstream``/``--output-dir``."""
    flags = {"ingest.manifest": data, "evaluate.tasks": list(downstream or []) or None, "output_dir": output_dir}
    data_dict = config_mod.layer_config(
        world_overrides,
        config_file or None,
        space.fixed,
        {"evaluate.tasks": list(space.downstream)} if space.downstream else None,
        list(overrides or []),
        {key: value for key, value in flags.items() if value},
    )
    return config_mod.layer_config(_absolute_paths(data_dict))


def _absolute_paths(data: dict) -> dict:
    """Make local paths absolute: Tune trials may run in another working directory."""
    def fix(value: str) -> str:
        if not value or "://" in value:
            return value
        expanded = os.path.expanduser(value)
        return os.path.abspath(expanded) if os.path.exists(expanded) or value.startswith((".", "~")) else value

    data["output_dir"] = storage.normalize(data["output_dir"])
    for section, key in (("ingest", "manifest"), ("model", "backbone_checkpoint"),
                         ("partition", "clip_pretrained"), ("partition", "anp_vocab")):
        data[section][key] = fix(data[section][key])
    return data


def sweep_ks(base: dict, trials: list[Trial]) -> list[int]:
    """Every K the sweep's trials use, plus the base's ``cluster.ks``: clustered in one pass."""
    ks = set(base["cluster"]["ks"]) | {int(base["train"]["k"])}
    for trial in trials:
        if "train.k" in trial.overrides:
            ks.add(int(trial.overrides["train.k"]))
    return sorted(ks)


def trial_config_dict(base: dict, trial: Trial, ks: list[int]) -> dict:
    """The full nested config of one trial (validated)."""
    return config_mod.layer_config(base, trial.overrides, {"cluster.ks": list(ks)})


def sweep_fingerprint(trial_configs: dict[str, dict]) -> str:
    """Identifies a sweep's exact trial list, so a relaunch only restores the same experiment."""
    return cache.content_key("sweep", sorted(trial_configs.items()))


# --------------------------------------------------------------------------- what Tune sees

# Always in a trial's Tune config (as well as every searched key): the method's headline
# hyperparameters, so ResultGrid and TensorBoard's HParams view show what each trial ran.
HEADLINE_KEYS = ("train.objective", "partition.sigma", "train.k", "train.temperature")
SHORT_NAMES = {"train.objective": "objective", "partition.sigma": "sigma", "train.k": "K",
               "train.temperature": "tau"}


def trial_hyperparameters(space: SweepSpace, trial_configs: dict[str, dict]) -> dict[str, dict]:
    """{trial: {dotted key: value}} over HEADLINE_KEYS and every searched or baseline key."""
    keys = list(HEADLINE_KEYS) + [k for k in space.search if k not in HEADLINE_KEYS]
    for overrides in space.baselines.values():
        keys += [k for k in overrides if k not in keys]
    return {name: {key: get_dotted(data, key) for key in keys} for name, data in trial_configs.items()}


def param_space(hyperparameters: dict[str, dict]) -> dict:
    """Tune's ``param_space``: a grid over trial names (the one-at-a-time layout is a fixed list,
    not a product) with each hyperparameter a value resolved from the trial's name, so a trial's
    ``config`` holds ``{"trial": name, "partition.sigma": 0.3, ...}``."""
    import ray.tune

    table = {name: dict(values) for name, values in hyperparameters.items()}
    keys = list(next(iter(table.values()), {}))
    space: dict = {"trial": ray.tune.grid_search(list(table))}
    for key in keys:
        space[key] = ray.tune.sample_from(lambda config, key=key: table[config["trial"]][key])
    return space


def run_label(name: str, hyperparameters: dict) -> str:
    """A run name that says what ran: trial, objective, sigma, K, tau (TensorBoard, MLflow)."""
    parts = [_safe_name(name)]
    for key in HEADLINE_KEYS:
        if key in hyperparameters:
            parts.append(f"{SHORT_NAMES[key]}={format_value(hyperparameters[key])}")
    return ",".join(parts)


class _TrialNamer:
    """Tune's ``trial_name_creator``: the trial's :func:`run_label` (a picklable callable: Tune
    saves it with the experiment for a restore)."""

    def __init__(self, hyperparameters: dict[str, dict]):
        self.hyperparameters = hyperparameters

    def __call__(self, trial: Any) -> str:
        name = trial.config["trial"]
        return run_label(name, self.hyperparameters.get(name, {}))


# A trial's start-up (pacl_ray.stages.train_loop.startup_times), reported with its evaluation when it
# trained (not when its training was cached): the summary table's start-to-first-step column.
STARTUP_METRICS = ("start_to_first_step_s", "driver_setup_s", "worker_start_s", "worker_to_first_step_s")


def tune_run_config(experiment_root: str, experiment_name: str, max_failures: int, callbacks: list) -> Any:
    """The sweep's ``ray.tune.RunConfig`` for experiments under ``experiment_root`` (a local path
    or pyarrow URI): ``storage_filesystem`` and ``storage_path`` from
    :func:`pacl_ray.formats.storage.resolve`, so credentials in the URI
    (``s3://KEY:SECRET@bucket/...``) live only in the filesystem object and the path Tune logs,
    prints and records has no scheme, user info or query. (Tune pickles that filesystem object
    for its workers, and pyarrow's pickle of an S3 filesystem built with explicit keys holds them:
    credentials from the environment or an instance profile keep them out of it too.) Tune's own
    console output is off."""
    import ray.tune

    fs, root = storage.resolve(experiment_root)
    return ray.tune.RunConfig(
        name=experiment_name, storage_path=root, storage_filesystem=fs,
        failure_config=ray.tune.FailureConfig(max_failures=max_failures),
        # Tune's own status tables and per-result dicts are off; TrialProgress prints
        # a line per trial start/end and a heartbeat, the report prints the results.
        verbose=0, callbacks=callbacks,
    )


# --------------------------------------------------------------------------- resources


def resolve_use_gpu(space: SweepSpace, base: dict, cluster_gpus: float) -> bool:
    if space.resources.use_gpu is not None:
        return bool(space.resources.use_gpu)
    if base["train"]["use_gpu"] is not None:
        return bool(base["train"]["use_gpu"])
    return cluster_gpus > 0


def max_concurrent_trials(space: SweepSpace, num_trials: int, use_gpu: bool,
                          cluster_cpus: float, cluster_gpus: float) -> int:
    """Trials that fit at once: each needs ``workers_per_trial`` Train workers (1 GPU or 1 CPU
    each) plus the trial process's own ``trial_gpus``/``trial_cpus``. At least 1 (an autoscaling
    cluster may start with no GPU node); ``resources.max_concurrent`` or ``--max-concurrent``
    override it."""
    res = space.resources
    if res.max_concurrent:
        return max(1, min(res.max_concurrent, num_trials))
    if use_gpu:
        need, have = res.workers_per_trial + res.trial_gpus, cluster_gpus
    else:
        need, have = res.workers_per_trial + res.trial_cpus, cluster_cpus
    return max(1, min(num_trials, int(math.floor(have / need + 1e-9))))


# --------------------------------------------------------------------------- evaluation


def flatten_rows(rows: list[dict]) -> dict[str, float]:
    """evaluate_backbone rows (one per task and protocol) into ``{"<dataset>/<column>": value}``
    over the metric columns (Acc-C, F1-C, mAP, AUC, MSE, R2). Linear evaluation is the paper's
    Table 5 protocol; other protocols and zero-shot prompts are suffixed to the dataset name."""
    from pacl_ray.evaluation.report import METRIC_COLUMN

    out: dict[str, float] = {}
    for i, row in enumerate(rows):
        name = str(row.get("dataset") or row.get("task") or f"task{i}").replace("/", "_")
        if row.get("protocol", "linear") != "linear":
            name += f"-{row['protocol']}"
        if row.get("prompt"):
            name += f"[{row['prompt']}]".replace("/", "_")
        for key, value in row.items():
            if METRIC_COLUMN.match(str(key)) and isinstance(value, (int, float)) and not isinstance(value, bool):
                if math.isfinite(float(value)):
                    out[f"{name}/{key}"] = float(value)
    return out


def evaluate_rows(cfg: config_mod.RunConfig, backbone: str, checkpoint: str, label: str, out_dir: str) -> list[dict]:
    """Downstream evaluation of one backbone on ``evaluate.tasks`` (its rows are cached by
    :mod:`pacl_ray.evaluation.evaluate`, so a relaunched sweep does not re-train probes)."""
    from pacl_ray.evaluation.evaluate import evaluate_backbone

    return evaluate_backbone(cfg, backbone, checkpoint, list(cfg.evaluate.tasks), out_dir, label=label)


def _safe_name(name: str) -> str:
    import re

    return re.sub(r"[^\w.=,+-]+", "_", name)


# --------------------------------------------------------------------------- the trial


def write_eval_tensorboard(sweep_dir: str, name: str, hyperparameters: dict, metrics: dict[str, float],
                           step: int) -> str:
    """TensorBoard event files of one trial's evaluation metrics (scalars under ``eval/`` and an
    HParams entry) in ``{sweep_dir}/tensorboard/<run label>``, written locally and copied through
    :mod:`pacl_ray.formats.storage`, so ``file://`` and ``s3://`` outputs both get them. Returns
    the run's URI ("" when tensorboard is not installed)."""
    import shutil
    import tempfile

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return ""
    label = run_label(name, hyperparameters)
    uri = storage.join(sweep_dir, "tensorboard", label)
    local = tempfile.mkdtemp(prefix="pacl-tb-")
    try:
        writer = SummaryWriter(local)
        for key, value in metrics.items():
            writer.add_scalar(f"eval/{key}", value, step)
        hparams = {SHORT_NAMES.get(k, k): (v if isinstance(v, (int, float, str, bool)) else str(v))
                   for k, v in hyperparameters.items()}
        writer.add_hparams(hparams, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")
        writer.close()
        for root, _, files in os.walk(local):
            for file in files:
                path = os.path.join(root, file)
                with open(path, "rb") as handle:
                    storage.write_bytes(storage.join(uri, os.path.relpath(path, local)), handle.read())
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return uri


def make_trainable(trial_configs: dict[str, dict], sweep_dir: str, driver_cwd: str, report_epochs: bool,
                   upstream: dict[str, dict] | None = None) -> Callable:
    """The Tune function trainable: train (a TorchTrainer inside the trial), evaluate, report.
    ``upstream``: {trial: {stage: StageOutput}} resolved once by the driver (:func:`prepare_upstream`);
    a trial then resolves none of them again. The trial's evaluation metrics also go to TensorBoard
    (:func:`write_eval_tensorboard`)."""

    def pacl_trial(config: dict) -> None:
        started_at = time.time()  # the trial's start-to-first-step counts from here
        import ray.tune

        if os.path.isdir(driver_cwd):
            os.chdir(driver_cwd)  # relative task specs resolve as on the command line
        name = config["trial"]
        cfg = config_mod.from_dict(trial_configs[name])
        callbacks = []
        if report_epochs:
            from ray.tune.integration.ray_train import TuneReportCallback

            callbacks.append(TuneReportCallback())
        from pacl_ray.evaluation.validation_set import load_validation_set
        from pacl_ray.stages import pipeline
        from pacl_ray.stages.validation import VAL_METRIC, latest_val

        # One CPU worker and no callbacks: the training loop runs in this trial process instead
        # of Ray Train's controller and worker processes (pacl_ray.stages.train_launch).
        result = pipeline.stage_train(cfg, callbacks=callbacks, upstream=(upstream or {}).get(name),
                                      validation=load_validation_set(cfg), started_at=started_at, in_process=True)
        out_dir = storage.join(sweep_dir, "trials", _safe_name(name))
        rows = evaluate_rows(cfg, cfg.model.backbone, result.backbone_checkpoint, name, out_dir)
        metrics = flatten_rows(rows)
        hyperparameters = {k: v for k, v in config.items() if k != "trial"}
        write_eval_tensorboard(sweep_dir, name, hyperparameters, metrics, int(cfg.train.epochs))
        startup = {} if result.cached else {k: result.final_metrics[k] for k in STARTUP_METRICS
                                            if k in result.final_metrics}
        ray.tune.report({
            **metrics, **startup, "trial": name, "backbone_checkpoint": result.backbone_checkpoint,
            "train_uri": result.uri, "evaluated": 1,
            # Tune wants ASHA's metric in every result, this last one included (NaN: not probed)
            **({VAL_METRIC: latest_val(result.history)} if report_epochs else {}),
        })

    return pacl_trial


# --------------------------------------------------------------------------- the driver


CACHED = " [cached]"  # what stages.cache.run_cached adds to a reused stage's summary


class OnceFilter(io.TextIOBase):
    """A stdout wrapper that passes each printed summary once: output is cut into blocks (a line
    at column 0 and the indented lines under it), and a block equal to one already passed, up to
    a " [cached]" ending its first (or last) line, is dropped. Trials of a sweep share stages, so
    each would print the same cached summaries again. A block is held only until the next block
    starts."""

    def __init__(self, stream):
        self.stream = stream
        self.seen: set[str] = set()
        self.block: list[str] = []
        self.partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.partial += text
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            if line[:1].isspace() and self.block:
                self.block.append(line)
            else:
                self._emit()
                self.block = [line]
        if self.block and self.block[0].startswith(("[", "(")):
            self._emit()  # a log line ("[tune] ...", Ray's "(pid=...)") has no indented body
        return len(text)

    def _emit(self) -> None:
        if not self.block:
            return
        text = "\n".join(self.block)
        head, newline, body = text.partition("\n")  # " [cached]" ends a summary's first line (stages.cache)
        key = head.removesuffix(CACHED) + newline + body.removesuffix(CACHED)
        self.block = []
        if key.strip() and key in self.seen:
            return
        self.seen.add(key)
        self.stream.write(text + "\n")
        self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()

    def close_block(self) -> None:
        """Emit what is held (the last block and any unterminated line)."""
        self._emit()
        if self.partial:
            self.stream.write(self.partial)
            self.partial = ""
        self.stream.flush()


def prepare_upstream(trial_configs: dict[str, dict], log: Callable[[str], None] = print) -> dict[str, dict]:
    """Resolve the stages trials share, once, on the driver: {trial: {stage: StageOutput}} of the
    four outputs training reads, handed to the trials so that none resolves them again. Every
    trial's partition is thresholded here too (cheap), so its report is available; scoring and
    clustering hit the cache after the first trial because their content keys exclude sigma and
    hold every K. Trials on the same data share one ingest resolution."""
    import contextlib

    upstream: dict[str, dict] = {}
    earlier: list = []
    once = OnceFilter(sys.stdout)
    with contextlib.redirect_stdout(once):
        try:
            _prepare_each(trial_configs, upstream, earlier, log)
        finally:
            once.close_block()
    return upstream


def _prepare_each(trial_configs: dict[str, dict], upstream: dict, earlier: list, log: Callable[[str], None]) -> None:
    from pacl_ray.stages import pipeline

    for name, data in trial_configs.items():
        cfg = config_mod.from_dict(data)
        start = time.time()
        pipe = pipeline.Pipeline(cfg)
        # Trials on the same data share one ingest resolution (ingest depends on these alone).
        for other in earlier:
            if (other.cfg.ingest, other.cfg.output_dir) == (cfg.ingest, cfg.output_dir):
                pipe.outputs["ingest"] = other.outputs["ingest"]
                break
        upstream[name] = pipe.upstream_of_train()
        earlier.append(pipe)
        partition, cluster = upstream[name]["partition"], upstream[name]["cluster"]
        log(f"[tune] upstream for {name}: partition {partition.key}{' (cached)' if partition.cached else ''}, "
            f"cluster {cluster.key}{' (cached)' if cluster.cached else ''} [{time.time() - start:.1f}s]")


def run_sweep(
    space: SweepSpace,
    base: dict,
    name: str,
    *,
    resume: bool = True,
    max_concurrent: int = 0,
    trainable_factory: Callable[..., Callable] = make_trainable,
    prepare: bool = True,
    initial: dict | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[TrialOutcome], SweepReport, dict]:
    """Expand, prepare shared stages, run (or restore) the Tune experiment, write the report.

    Returns (outcomes, report, partitions). ``trainable_factory(trial_configs, sweep_dir,
    driver_cwd, report_epochs)`` builds the function trainable (tests substitute a cheap one)."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    from pacl_ray.stages.runtime import cluster_cpus, cluster_gpus

    check_asha(space, base)
    trials = expand_trials(space, base)
    ks = sweep_ks(base, trials)
    trial_configs = {t.name: trial_config_dict(base, t, ks) for t in trials}
    for data in trial_configs.values():
        data["train"]["num_workers"] = space.resources.workers_per_trial
        if space.resources.use_gpu is not None:
            data["train"]["use_gpu"] = space.resources.use_gpu
    fingerprint = sweep_fingerprint(trial_configs)
    sweep_dir = storage.join(base["output_dir"], "sweeps", name)
    experiment_root = storage.join(sweep_dir, "tune")
    experiment_name = f"{name}-{fingerprint[:8]}"
    experiment_path = storage.join(experiment_root, experiment_name)
    storage.write_text(storage.join(sweep_dir, "sweep.json"), json.dumps({
        "space": space.path, "fingerprint": fingerprint, "experiment": storage.redact(experiment_path),
        "trials": [t.to_dict() for t in trials], "cluster_ks": ks,
    }, indent=2, default=str))
    log(f"[tune] sweep {name}: {len(trials)} trials ({space.mode}); K values clustered once: {ks}")

    upstream = prepare_upstream(trial_configs, log) if prepare else {}
    partitions = {name: outputs["partition"] for name, outputs in upstream.items()}

    use_gpu = resolve_use_gpu(space, base, cluster_gpus())
    concurrency = max_concurrent or max_concurrent_trials(
        space, len(trials), use_gpu, cluster_cpus(), cluster_gpus())
    trainable = trainable_factory(trial_configs, sweep_dir, os.getcwd(), space.asha is not None,
                                  **({"upstream": upstream} if upstream else {}))
    trainable = ray.tune.with_resources(
        trainable, {"cpu": space.resources.trial_cpus, "gpu": space.resources.trial_gpus})

    scheduler = None
    if space.asha is not None:
        epochs = max(int(d["train"]["epochs"]) for d in trial_configs.values())
        # +1: ASHA stops a trial at max_t, and the last epoch must still reach its evaluation.
        scheduler = ASHAScheduler(
            time_attr=space.asha.time_attr, metric=space.asha.metric, mode=space.asha.mode,
            max_t=(space.asha.max_t or epochs) + 1, grace_period=space.asha.grace_period,
            reduction_factor=space.asha.reduction_factor)

    from pacl_ray.sweeps.tracking import TrialProgress, tracking_callbacks

    callbacks = [TrialProgress(len(trials), log),
                 *tracking_callbacks(base.get("tracking") or {}, name, sweep_dir, log)]
    if not resume and storage.exists(experiment_path):
        storage.delete_dir(experiment_path)
    tune_fs, tune_root = storage.resolve(experiment_root)  # as tune_run_config: credentials stay in tune_fs
    if storage.redact(experiment_root) != experiment_root:
        log("[tune] note: output_dir's URI carries credentials; Tune keeps them only inside its pickled "
            "filesystem object (tuner.pkl), never in paths or logs. AWS_* variables or an instance profile "
            "keep them out of that too.")
    tune_path = f"{tune_root.rstrip('/')}/{experiment_name}"
    if resume and ray.tune.Tuner.can_restore(tune_path, storage_filesystem=tune_fs):
        log(f"[tune] resuming {storage.redact(experiment_path)} (finished trials are kept)")
        tuner = ray.tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True, storage_filesystem=tune_fs)
    else:
        log(f"[tune] starting {storage.redact(experiment_path)}; up to {concurrency} trial(s) at once"
            f"{' on GPU' if use_gpu else ' on CPU'}")
        hyperparameters = trial_hyperparameters(space, trial_configs)
        tuner = ray.tune.Tuner(
            trainable,
            param_space=param_space(hyperparameters),
            tune_config=ray.tune.TuneConfig(
                max_concurrent_trials=concurrency, scheduler=scheduler,
                # Trial names and folders say what ran (trial, objective, sigma, K, tau): Ray's
                # TensorBoard, MLflow and W&B runs take these names.
                trial_name_creator=_TrialNamer(hyperparameters),
                trial_dirname_creator=_TrialNamer(hyperparameters)),
            run_config=tune_run_config(experiment_root, experiment_name, space.max_failures, callbacks),
        )
    with TuneInterruptWatch(log) as watch:
        grid = tuner.fit()
    interrupted = watch.interrupted or not grid_finished(grid)
    outcomes = collect_outcomes(grid, trials, interrupted=interrupted)
    finished = sum(1 for o in outcomes if o.error != INTERRUPTED)  # evaluated, or failed for good
    incomplete = f"interrupted, {finished} of {len(outcomes)} trials finished" if interrupted else ""
    report = write_report(space, base, trial_configs, outcomes, sweep_dir, initial, incomplete=incomplete)
    report.result_grid = grid
    if interrupted:
        stopped = [o.trial.name for o in outcomes if o.error == INTERRUPTED]
        log(f"[tune] stopped, not finished: {', '.join(stopped) or 'none'}")
        raise SweepInterrupted(f"{finished} of {len(outcomes)} trials finished; incomplete table: "
                               f"{storage.join(sweep_dir, 'results.md')}")
    return outcomes, report, partitions


INTERRUPTED = "interrupted"  # a trial's error when the sweep was stopped while it ran or waited


class SweepInterrupted(KeyboardInterrupt):
    """The sweep was stopped (Ctrl-C or SIGTERM) while its trials ran: Tune saved the experiment's
    state (a relaunch restores it) and the report was written marked incomplete. ``str()`` says
    how many trials finished."""


class TuneInterruptWatch:
    """Around ``Tuner.fit()``: learns whether Tune's SIGINT handler stopped the run and keeps
    Tune's console lines about it in our words.

    Tune 2.x installs its own SIGINT handler for ``fit`` (``ray.tune.tune._setup_signal_catching``):
    a first Ctrl-C logs "Stop signal received ...", ends the loop, saves the experiment state,
    stops the running trials and returns a ResultGrid as if the run were done, after logging
    "Experiment has been interrupted ... Resume experiment with: Tuner.restore(...)" (a second
    Ctrl-C raises KeyboardInterrupt at once). ``fit`` says nothing else about it, so those log
    records of the ``ray.tune.tune`` logger are what this watches: the first is replaced by one
    line, the restore hint (the command line prints the command that resumes instead) and the
    "Trials did not complete" list are dropped. The SIGINT handler in place before ``fit`` is put
    back afterwards (Tune leaves its own installed when the run ends normally)."""

    LOGGER = "ray.tune.tune"

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log
        self.interrupted = False

    def filter(self, record: Any) -> bool:
        message = str(record.msg)
        if message.startswith("Stop signal received"):
            import signal

            from pacl_ray.stages.runtime import note_stop_signal

            self.interrupted = True
            note_stop_signal(signal.SIGINT)
            self.log("[tune] interrupted: saving the sweep's state, then stopping the running trials (their "
                     "lines go on until they stop; they are not results, the same command resumes them)")
            return False
        if "has been interrupted" in message or (self.interrupted and message.startswith("Trials did not complete")):
            return False
        return True

    def __enter__(self) -> "TuneInterruptWatch":
        import logging
        import signal
        import threading

        self._main = threading.current_thread() is threading.main_thread()
        self._sigint = signal.getsignal(signal.SIGINT) if self._main else None
        logging.getLogger(self.LOGGER).addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        import logging
        import signal

        logging.getLogger(self.LOGGER).removeFilter(self)
        if self._main and self._sigint is not None:
            signal.signal(signal.SIGINT, self._sigint)


def grid_finished(grid: Any) -> bool:
    """Every trial of the ResultGrid ended (terminated or errored): a trial still pending
    means the run was stopped before it."""
    try:
        return grid.num_terminated + grid.num_errors >= len(grid)
    except (AttributeError, TypeError):  # a test's stand-in grid: a plain list of results
        return True


def collect_outcomes(grid: Any, trials: list[Trial], interrupted: bool = False) -> list[TrialOutcome]:
    """Per trial (in sweep order): its last reported metrics, exported backbone, or error. When
    the sweep was ``interrupted``, a trial that neither finished its evaluation nor failed is
    :data:`INTERRUPTED` (Tune stopped it), not "stopped early" (a scheduler's decision)."""
    by_name: dict[str, TrialOutcome] = {}
    for result in grid:
        name = (result.config or {}).get("trial")
        if name is None:
            continue
        metrics = result.metrics or {}
        outcome = TrialOutcome(
            trial=next(t for t in trials if t.name == name),
            metrics={k: float(v) for k, v in metrics.items()
                     if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool)
                     and metrics.get("evaluated")},
            backbone=str(metrics.get("backbone_checkpoint", "") or ""),
            error=_short_error(result.error) if result.error else (
                "" if metrics.get("evaluated") else INTERRUPTED if interrupted else "stopped early"),
            start_to_first_step_s=_float_or_none(metrics.get("start_to_first_step_s")),
        )
        by_name[name] = outcome
    return [by_name.get(t.name, TrialOutcome(t, error=INTERRUPTED if interrupted else "not run")) for t in trials]


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _short_error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:200]


# --------------------------------------------------------------------------- the command


def _print_world(world: Any) -> None:
    from pacl_ray.world.build import format_report

    print("\n== Embedded world: the affective gap and the planted partitions ==")
    print(format_report(world.report))


def run_tune(
    space: str = DEFAULT_SPACE,
    *,
    data: str | None = None,
    downstream: list[str] | None = None,
    name: str | None = None,
    output_dir: str | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    resume: bool = True,
    max_concurrent: int = 0,
    world: str = "default",
    world_dir: str | None = None,
    world_seed: int = 0,
    on_sweep_dir: Callable[[str], None] | None = None,
) -> int:
    """``pacl-ray tune`` (also ``python -m pacl_ray.tune``; flags in :mod:`pacl_ray.cli`).

    Raises SpaceError / ConfigError (the output directory included: it is checked for
    writability before Ray starts or the world is built); the CLI reports them in one line.
    ``on_sweep_dir(uri)`` is told where the sweep keeps its outputs as soon as that is known."""
    args = types.SimpleNamespace(
        space=space, data=data, downstream=list(downstream or []), name=name, output_dir=output_dir,
        config=config, overrides=list(overrides or []), resume=resume, max_concurrent=max_concurrent,
        world=world, world_dir=world_dir, world_seed=world_seed)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    space = load_space(resolve_space_path(args.space))
    probe = base_config_dict(space, config_file=args.config, overrides=args.overrides,
                             data=args.data, downstream=args.downstream, output_dir=args.output_dir)
    # before Ray starts or the world is built (the world supplies evaluate.tasks)
    check_asha(space, probe, tasks_known=bool(probe["ingest"]["manifest"]))
    check_metric(space, probe)  # a metric that will not be a result column, when the tasks are known
    ray_cfg = config_mod.from_dict(probe).ray
    config_mod.check_output_dir(probe["output_dir"])
    if args.world_dir and not probe["ingest"]["manifest"]:
        config_mod.check_output_dir(args.world_dir, key="--world-dir")

    from pacl_ray.stages.runtime import init_ray

    # Ray first: its processes start in the background while a first run builds the world (whose
    # data generation leaves a core free).
    init_ray(ray_cfg)
    world = None
    if not probe["ingest"]["manifest"]:
        from pacl_ray.world.build import ensure_world

        world = ensure_world(cache_dir=args.world_dir, seed=args.world_seed, size=args.world)
    base = base_config_dict(space, world_overrides=world.config_overrides() if world else None,
                            config_file=args.config, overrides=args.overrides, data=args.data,
                            downstream=args.downstream, output_dir=args.output_dir)
    if not base["evaluate"]["tasks"]:
        raise config_mod.ConfigError(
            "evaluate.tasks is empty: give --downstream TASKSPEC or `downstream:` in the space")
    check_metric(space, base)  # the world's tasks are known now, before the initial evaluation

    name = args.name or space.name
    cfg = config_mod.from_dict(base)
    if world is not None:
        _print_world(world)
    sweep_dir = storage.join(base["output_dir"], "sweeps", name)
    if on_sweep_dir is not None:
        on_sweep_dir(sweep_dir)
    # The resolved config goes to a file (its path is printed), not to the console.
    config_path = storage.join(sweep_dir, "config.yaml")
    storage.write_text(config_path, config_mod.dump_config(cfg))
    print(f"[tune] resolved config: {config_path}")
    initial = flatten_rows(evaluate_rows(cfg, cfg.model.backbone, cfg.model.backbone_checkpoint, "initial",
                                         storage.join(sweep_dir, "initial")))
    outcomes, report, partitions = run_sweep(space, base, name, resume=args.resume,
                                             max_concurrent=args.max_concurrent, initial=initial)
    print("\n== Initial backbone (before PACL) ==")
    for key, value in initial.items():
        print(f"  {key}: {value:.2f}")
    print(f"\n== Sweep {name}: {report.sweep_dir} ==\n")
    print(report.markdown)
    # The export *directory* is what loaders take (timm's "local-dir:", --backbone), and the
    # architecture is the name to give timm.create_model: config.json's (timm), else export.json's.
    from pacl_ray.formats import export as export_format

    print('Exported backbones (load with timm.create_model("local-dir:<directory>", pretrained=True)):')
    for outcome in outcomes:
        folder = outcome.backbone
        if folder.endswith("/" + export_format.EXPORT_BACKBONE):
            folder = folder[: -len(export_format.EXPORT_BACKBONE) - 1]
        architecture = ""
        if folder:
            try:
                architecture = str(export_format.timm_config(folder).get("architecture", ""))
            except export_format.ExportError:  # not a timm export (open_clip has no config.json)
                try:
                    architecture = str(export_format.read_export_meta(folder)["backbone"])
                except export_format.ExportError:
                    pass
        print(f"  {outcome.trial.name}: {folder or '-'}" + (f" (architecture {architecture})" if architecture else ""))
    if partitions:
        print("Partition reports (split, score histograms, gallery):")
        for trial_name, partition in partitions.items():
            print(f"  {trial_name}: {partition.uri}")
    print(f"TensorBoard (evaluation metrics per trial): tensorboard --logdir {storage.join(report.sweep_dir, 'tensorboard')}")
    print(f"Resolved base config: {config_path}")
    if report.best is not None:
        print(f"\n== Best config ({report.metric} = {report.best.metrics[report.metric]:.2f}, "
              f"trial {report.best.trial.name}) -> {storage.join(report.sweep_dir, 'best_config.yaml')} ==")
    failed = [o for o in outcomes if o.error and o.error != "stopped early"]
    if failed:
        for outcome in failed:
            print(f"pacl-ray tune: trial {outcome.trial.name} failed: {outcome.error}", file=sys.stderr)
        return 1
    return 0

