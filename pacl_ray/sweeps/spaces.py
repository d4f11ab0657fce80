"""Search spaces for sweeps: parse and validate a ``tune_spaces/*.yaml`` file, expand it into trials.

Pure: no Ray. A space file looks like::

    mode: one_at_a_time          # or: product, rows
    num_samples: 1               # draws per random key (uniform / loguniform / choice)
    seed: 0
    fixed:                       # nested config overrides shared by every trial
      train: {epochs: 30}
    search:                      # dotted config key -> domain
      partition.sigma: {grid: [0, 0.3, 0.5, 0.7, 0.9, 1]}
      train.temperature: {loguniform: [0.01, 0.5]}
    rows:                        # mode rows only: named override sets, one trial each, in order
      - {name: "Both: Strong-coupled", labels: {partition: Both}, set: {train.partitions: [1]}}
    baselines:                   # extra named trials (dotted overrides)
      vanilla: {train.objective: clip}
    downstream: ["single:fi=/data/FI"]          # evaluate task specs
    metric: {name: FI/Acc-8, mode: max}
    resources: {workers_per_trial: 1, use_gpu: true}
    asha: {grace_period: 1, reduction_factor: 2}   # ranks on val_acc: needs validation.every_epochs
    max_failures: 1              # retries of a trial whose process died (lost node)
    seeds: [0, 1, 2]             # repeat every trial per training seed (or repeats: 3, or
                                 # search: {seed: {grid: [0, 1, 2]}}); results give mean and std
    layout: table5               # results.md as the paper's table5 (default), table4, table1, table2

``one_at_a_time`` is the paper's Table 5: each searched key is varied alone, every other key at
its adopted (fixed or default) value; the all-adopted trial is run once and shared by every key.
``product`` is the cartesian product of grid keys, repeated ``num_samples`` times with fresh
draws of the random keys (Ray Tune's ``grid_search`` x ``num_samples`` semantics). ``rows`` is a
table whose rows change several keys at once (the paper's Table 4): each row is one trial with
its ``set`` overrides (empty = the base config), its ``name``, and optional ``labels`` (column ->
text) for a report laid out like the paper's table; ``search`` is not allowed with it.

Trials are expanded here, deterministically from ``seed``, rather than by Tune's own samplers:
the one-at-a-time layout and the shared adopted trial are not expressible as a Tune space, and a
fixed trial list is what lets an interrupted sweep be resumed trial for trial.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from pacl_ray import config as config_mod

DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform")
MODES = ("one_at_a_time", "product", "rows")
TOP_LEVEL_KEYS = (
    "name", "mode", "num_samples", "seed", "fixed", "search", "rows", "baselines", "downstream",
    "metric", "resources", "asha", "max_failures", "seeds", "repeats", "layout",
)
# results.md laid out as the paper's Table 5 (blocks per searched key), Table 4 (each row's labels,
# mode rows), Table 1 or Table 2 (the paper's columns; see pacl_ray.sweeps.report)
LAYOUTS = ("table5", "table4", "table1", "table2")
ROW_KEYS = ("name", "set", "labels")
# What ASHA may rank on: the training stage's held-out probe (pacl_ray.stages.validation.VAL_METRIC),
# higher is better. Named here, not imported, so that reading a space does not import torch.
ASHA_METRICS = {"val_acc": "max"}
# Metrics the training stage reports on its own batches: their scale moves with tau, and which L_k
# enter `total` moves with sigma and K, so trials cannot be ranked on them.
TRAINING_LOSS_PREFIXES = ("total", "loss", "l_", "l1", "l2", "l3", "l4", "lr", "share_", "samples_per_s")
SEED_KEY = "seed"  # the config's top-level training seed: a seed axis, not a searched key


class SpaceError(ValueError):
    """A search-space file is malformed; the message names the file and the key."""


# --------------------------------------------------------------------------- typed space


@dataclass(frozen=True)
class Domain:
    """Values one searched key takes. ``values`` for grid/choice; ``low``/``high`` for ranges."""

    kind: str
    values: tuple = ()
    low: float = 0.0
    high: float = 0.0

    @property
    def is_random(self) -> bool:
        """Sampled (choice, uniform, loguniform) rather than enumerated (grid)."""
        return self.kind != "grid"

    def sample(self, rng: random.Random) -> Any:
        if self.kind == "choice":
            return rng.choice(self.values)
        if self.kind == "uniform":
            return rng.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        raise SpaceError("grid domains are enumerated, not sampled")

    @property
    def log_scale(self) -> bool:
        """Whether a plot of this key reads best on a log axis."""
        if self.kind == "loguniform":
            return True
        numbers = [v for v in self.values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        positive = [v for v in numbers if v > 0]
        return len(positive) == len(self.values) >= 2 and max(positive) / min(positive) >= 20


@dataclass(frozen=True)
class Metric:
    """The result column a sweep optimises, ``"<task>/<column>"``, e.g. ``"FI/Acc-8"``."""

    name: str
    mode: str = "max"

    def better(self, a: float, b: float) -> bool:
        """True when ``a`` is strictly better than ``b``."""
        return a > b if self.mode == "max" else a < b


@dataclass(frozen=True)
class Resources:
    """What one trial uses. The trial process itself (which waits on its TorchTrainer and then
    runs the downstream evaluation) reserves ``trial_cpus``/``trial_gpus``; its Ray Train workers
    reserve their own (1 CPU or 1 GPU each)."""

    workers_per_trial: int = 1
    use_gpu: Optional[bool] = None  # None = when the cluster has GPUs
    trial_cpus: float = 1.0  # Ray Tune needs the trial process to reserve something (> 0)
    trial_gpus: float = 0.0
    max_concurrent: int = 0  # 0 = as many as the cluster's CPUs/GPUs fit


@dataclass(frozen=True)
class Asha:
    """Asynchronous successive halving over training epochs (Ray Tune's ``ASHAScheduler``).

    It acts on what the training stage reports while training (the downstream metric only exists
    once a trial has finished), and that has to be comparable across trials: the held-out
    validation probe's ``val_acc`` (:mod:`pacl_ray.stages.validation`, on with
    ``validation.every_epochs``), never the training loss (:func:`check_asha`)."""

    metric: str = "val_acc"  # ASHA_METRICS: what the train stage reports with each checkpoint
    mode: str = "max"
    time_attr: str = "epoch"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int = 0  # 0 = train.epochs


@dataclass(frozen=True)
class Row:
    """One row of a ``mode: rows`` space: a named set of dotted-key overrides (validated) and the
    labels of the row in the paper's layout (e.g. ``{partition: Factual, sample usage: ...}``)."""

    name: str
    overrides: dict
    labels: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SweepSpace:
    path: str
    name: str
    mode: str
    num_samples: int
    seed: int
    fixed: dict
    search: dict  # dotted key -> Domain, in file order
    baselines: dict  # name -> {dotted key: value}
    downstream: tuple
    metric: Optional[Metric]
    resources: Resources
    asha: Optional[Asha]
    max_failures: int = 1  # retries of a trial whose process died (e.g. its node was reclaimed)
    rows: tuple = ()  # Row, in file order (mode rows)
    seeds: tuple = ()  # the seed axis: every trial repeated per training seed ("seed" config key)
    repeats: int = 0  # seeds base seed .. base seed + repeats - 1 (when ``seeds`` is empty)
    layout: str = "table5"  # one of LAYOUTS: how results.md lays the trials out

    def seed_values(self, base: dict) -> tuple:
        """The seed axis given the resolved base config: ``seeds``, else ``repeats`` seeds from the
        base's ``seed``; () = no axis (every trial once, at the base seed)."""
        if self.seeds:
            return tuple(self.seeds)
        start = int(base.get(SEED_KEY, 0))
        return tuple(range(start, start + self.repeats))


@dataclass(frozen=True)
class Trial:
    """One configuration to train and evaluate.

    ``varied`` holds the searched keys this trial sets away from the base config (empty for the
    shared adopted trial); ``baseline`` names a baseline trial ("" otherwise). On a seed axis,
    ``seed`` is the training seed and ``repeat_of`` the name of the row the seeds are averaged
    into (the trial's name without ``@seed=N``)."""

    name: str
    varied: dict = field(default_factory=dict)
    baseline: str = ""
    baseline_overrides: dict = field(default_factory=dict)
    seed: Optional[int] = None
    repeat_of: str = ""

    @property
    def overrides(self) -> dict:
        """Dotted-key overrides to apply on top of the sweep's base config."""
        seed = {} if self.seed is None else {SEED_KEY: self.seed}
        return {**self.baseline_overrides, **self.varied, **seed}

    @property
    def group(self) -> str:
        """The results-table row this trial belongs to (its own name unless it is one seed of it)."""
        return self.repeat_of or self.name

    def to_dict(self) -> dict:
        out = {"name": self.name, "varied": dict(self.varied), "baseline": self.baseline,
               "baseline_overrides": dict(self.baseline_overrides)}
        if self.seed is not None:
            out.update(seed=self.seed, repeat_of=self.repeat_of)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Trial":
        return cls(data["name"], dict(data.get("varied", {})), data.get("baseline", ""),
                   dict(data.get("baseline_overrides", {})), data.get("seed"), data.get("repeat_of", ""))


# --------------------------------------------------------------------------- dotted keys


def get_dotted(data: dict, key: str) -> Any:
    """The value at a dotted key; None for an entry a mapping field does not hold (an unset
    ``model.backbone_kwargs.drop_path_rate`` is the architecture's default)."""
    node: Any = data
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


set_dotted = config_mod.set_dotted  # "a.b.c" into a nested mapping (in place; also returned)


def apply_dotted(base: dict, overrides: dict) -> dict:
    """A deep copy of ``base`` with dotted-key ``overrides`` applied."""
    out = _deepcopy(base)
    for key, value in overrides.items():
        set_dotted(out, key, value)
    return out


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


# --------------------------------------------------------------------------- parsing


def _fail(where: str, message: str) -> SpaceError:
    return SpaceError(f"{where}: {message}")


def _check_config_value(where: str, key: str, value: Any) -> None:
    """Raise unless ``key=value`` is a valid value of :class:`pacl_ray.config.RunConfig` (its type
    and its domain, both checked by :mod:`pacl_ray.config`)."""
    try:
        config_mod.layer_config({key: value})
    except config_mod.ConfigError as err:
        raise _fail(where, str(err)) from None


def _leaf_type(key: str) -> Any:
    """The annotation of a dotted RunConfig key (e.g. ``float`` for ``partition.sigma``)."""
    return config_mod.leaf_annotation(key)


def parse_domain(where: str, key: str, spec: Any) -> Domain:
    """One ``search:`` entry: ``{grid: [...]}``, ``{choice: [...]}``, ``{uniform: [lo, hi]}`` or
    ``{loguniform: [lo, hi]}``; every value is type-checked against the config key."""
    where = f"{where}: search.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SpaceError(
            f"{where}: expected exactly one of {', '.join(DOMAIN_KINDS)}, e.g. {{grid: [0.5, 0.7]}}; "
            f"got {spec!r}"
        )
    ((kind, values),) = spec.items()
    if kind not in DOMAIN_KINDS:
        raise SpaceError(f"{where}: unknown domain {kind!r}; expected one of {', '.join(DOMAIN_KINDS)}")
    if kind in ("grid", "choice"):
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{where}.{kind}: expected a non-empty list of values, got {values!r}")
        if len({yaml.safe_dump(v) for v in values}) != len(values):
            raise SpaceError(f"{where}.{kind}: repeated values in {values!r}")
        for i, value in enumerate(values):
            _check_config_value(f"{where}.{kind}[{i}]", key, value)
        return Domain(kind, tuple(values))
    if (
        not isinstance(values, list) or len(values) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    ):
        raise SpaceError(f"{where}.{kind}: expected [low, high] numbers, got {values!r}")
    low, high = float(values[0]), float(values[1])
    if not low < high:
        raise SpaceError(f"{where}.{kind}: low {low} must be below high {high}")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{where}.{kind}: bounds must be positive, got {values!r}")
    annotation = _leaf_type(key)
    if annotation is int:
        raise SpaceError(f"{where}.{kind}: {key} is an integer key; use grid or choice")
    if annotation not in (float, Optional[float]):
        raise SpaceError(f"{where}.{kind}: {key} is not a number key; use grid or choice")
    # Intervals are convex: both bounds inside the key's domain puts every draw inside it.
    _check_config_value(f"{where}.{kind}[0]", key, low)
    _check_config_value(f"{where}.{kind}[1]", key, high)
    return Domain(kind, (), low, high)


def _parse_overrides(where: str, data: Any) -> dict:
    """A mapping of overrides, nested or dotted, flattened to dotted keys and validated."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpaceError(f"{where}: expected a mapping of config keys, got {data!r}")
    flat: dict = {}

    def walk(prefix: str, node: dict) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict) and _is_section(dotted):
                walk(f"{dotted}.", value)
            else:
                flat[dotted] = value

    walk("", data)
    try:
        config_mod.layer_config(flat)
    except config_mod.ConfigError as err:
        raise _fail(where, str(err)) from None
    return flat


def _parse_dataclass(where: str, cls: type, data: Any) -> Any:
    import dataclasses

    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise SpaceError(f"{where}: expected a mapping, got {data!r}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        section = f"of {where.rsplit(': ', 1)[-1]}"  # where = "<path>: metric"
        raise SpaceError(f"{where}.{unknown[0]}: unknown key; "
                         f"{config_mod.close_keys('', unknown[0], names, section, config_keys=False)}")
    return cls(**data)


def _check_number(where: str, value: Any, *, integer: bool = False, minimum: float = 0) -> None:
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not ok or value < minimum:
        kind = "an integer" if integer else "a number"
        raise SpaceError(f"{where}: expected {kind} >= {minimum}, got {value!r}")


def parse_space(data: Any, path: str = "<space>") -> SweepSpace:
    """Validate a loaded space mapping; every error names ``path`` and the offending key."""
    if not isinstance(data, dict):
        raise SpaceError(f"{path}: the top level must be a mapping")
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        message = config_mod.close_keys("", unknown[0], TOP_LEVEL_KEYS, "of a space file", config_keys=False)
        if config_mod.leaf_annotation(str(unknown[0])) is not None:  # a config section or key: it goes under fixed
            message += f"; config values go under fixed, e.g. fixed: {{{unknown[0]}: ...}}"
        raise SpaceError(f"{path}: {unknown[0]}: unknown key; {message}")

    mode = data.get("mode", "one_at_a_time")
    if mode not in MODES:
        raise SpaceError(f"{path}: mode: expected one of {', '.join(MODES)}, got {mode!r}")
    num_samples = data.get("num_samples", 1)
    _check_number(f"{path}: num_samples", num_samples, integer=True, minimum=1)
    seed = data.get("seed", 0)
    _check_number(f"{path}: seed", seed, integer=True)

    fixed = _parse_overrides(f"{path}: fixed", data.get("fixed"))
    fixed_nested: dict = {}
    for key, value in fixed.items():
        set_dotted(fixed_nested, key, value)

    search_data = data.get("search") or {}
    if not isinstance(search_data, dict):
        raise SpaceError(f"{path}: search: expected a mapping of dotted config keys to domains")
    search = {}
    seeds = _parse_seeds(path, data.get("seeds"), search_data.get(SEED_KEY) if isinstance(search_data, dict) else None)
    repeats = data.get("repeats", 0)
    _check_number(f"{path}: repeats", repeats, integer=True)
    if seeds and repeats:
        raise SpaceError(f"{path}: repeats: give either seeds (a list) or repeats (a count), not both")
    for key, spec in search_data.items():
        if key == SEED_KEY:
            continue  # the seed axis (_parse_seeds)
        if not isinstance(key, str) or "." not in key:
            problem = config_mod.key_error(str(key))
            raise SpaceError(f"{path}: search.{key}: keys are dotted config keys like partition.sigma"
                             + (f"; {problem}" if problem else ""))
        problem = config_mod.key_error(key, named=False)
        if problem:
            raise SpaceError(f"{path}: search.{key}: not a config key; {problem}")
        search[key] = parse_domain(path, key, spec)

    rows = _parse_rows(path, mode, data.get("rows"), search)

    baselines_data = data.get("baselines") or {}
    if not isinstance(baselines_data, dict):
        raise SpaceError(f"{path}: baselines: expected a mapping of name -> config overrides")
    baselines = {}
    for name, overrides in baselines_data.items():
        if not overrides:
            raise SpaceError(f"{path}: baselines.{name}: give at least one config override")
        baselines[str(name)] = _parse_overrides(f"{path}: baselines.{name}", overrides)

    downstream = data.get("downstream") or []
    if isinstance(downstream, str):
        downstream = [downstream]
    if not isinstance(downstream, list) or not all(isinstance(t, str) and t for t in downstream):
        raise SpaceError(f"{path}: downstream: expected a list of task specs, got {downstream!r}")

    metric = None
    metric_data = data.get("metric")
    if isinstance(metric_data, str):
        metric_data = {"name": metric_data}
    if metric_data is not None:
        metric = _parse_dataclass(f"{path}: metric", Metric, metric_data)
        if not isinstance(metric.name, str) or "/" not in metric.name:
            raise SpaceError(f"{path}: metric.name: expected '<task>/<column>' like FI/Acc-8, got {metric.name!r}")
        if metric.mode not in ("max", "min"):
            raise SpaceError(f"{path}: metric.mode: expected max or min, got {metric.mode!r}")

    resources = _parse_dataclass(f"{path}: resources", Resources, data.get("resources"))
    _check_number(f"{path}: resources.workers_per_trial", resources.workers_per_trial, integer=True, minimum=1)
    _check_number(f"{path}: resources.trial_cpus", resources.trial_cpus)
    _check_number(f"{path}: resources.trial_gpus", resources.trial_gpus)
    _check_number(f"{path}: resources.max_concurrent", resources.max_concurrent, integer=True)
    if resources.trial_cpus + resources.trial_gpus <= 0:
        raise SpaceError(f"{path}: resources.trial_cpus: the trial process must reserve some CPU or GPU "
                         f"(e.g. 0.1); Ray Tune cannot schedule a trial that reserves nothing")
    if resources.use_gpu not in (None, True, False):
        raise SpaceError(f"{path}: resources.use_gpu: expected true, false or null")

    asha = None
    if data.get("asha") is not None:
        asha = _parse_dataclass(f"{path}: asha", Asha, data.get("asha"))
        _check_number(f"{path}: asha.grace_period", asha.grace_period, integer=True, minimum=1)
        _check_number(f"{path}: asha.max_t", asha.max_t, integer=True)
        if not (isinstance(asha.reduction_factor, (int, float)) and asha.reduction_factor > 1):
            raise SpaceError(f"{path}: asha.reduction_factor: expected a number > 1")
        if asha.mode not in ("max", "min"):
            raise SpaceError(f"{path}: asha.mode: expected max or min, got {asha.mode!r}")
        _check_asha_metric(path, asha)

    max_failures = data.get("max_failures", 1)
    _check_number(f"{path}: max_failures", max_failures, integer=True)

    layout = data.get("layout", "table5")
    if layout not in LAYOUTS:
        raise SpaceError(f"{path}: layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "table4" and mode != "rows":
        raise SpaceError(f"{path}: layout: table4 lays out the labels of rows; it needs mode: rows (mode is {mode})")

    name = data.get("name") or _stem(path)
    return SweepSpace(
        path=path, name=str(name), mode=mode, num_samples=num_samples, seed=seed,
        fixed=fixed_nested, search=search, baselines=baselines, downstream=tuple(downstream),
        metric=metric, resources=resources, asha=asha, max_failures=max_failures, rows=rows,
        seeds=seeds, repeats=repeats, layout=layout,
    )


def _check_asha_metric(path: str, asha: Asha) -> None:
    """Refuse an ASHA metric that is not comparable across trials (SpaceError naming the key)."""
    metric = asha.metric
    allowed = ", ".join(f"{m} (mode {d})" for m, d in ASHA_METRICS.items())
    if metric in ASHA_METRICS:
        if asha.mode != ASHA_METRICS[metric]:
            raise SpaceError(f"{path}: asha.mode: {metric} is an accuracy, higher is better: "
                             f"mode {ASHA_METRICS[metric]}, got {asha.mode!r}")
        return
    if not isinstance(metric, str) or metric.lower().startswith(TRAINING_LOSS_PREFIXES):
        why = (f"{metric!r} is a training-loss signal, which is not comparable across trials (tau changes "
               "its scale; sigma and K change which L_k enter it), so ASHA would stop trials on a "
               "meaningless number")
    elif "/" in metric:
        why = (f"{metric!r} is a downstream metric, which exists only once a trial has finished "
               "training, so ASHA cannot stop a trial on it")
    else:
        why = f"{metric!r} is not a metric the training stage reports while training"
    raise SpaceError(f"{path}: asha.metric: {why}; allowed: {allowed}, the held-out validation probe "
                     "(set validation.every_epochs and validation.task), or remove `asha:` from the space")


def check_asha(space: SweepSpace, base: Optional[dict] = None, *, tasks_known: bool = True) -> None:
    """Refuse ASHA that has nothing comparable across trials to rank on (SpaceError naming the keys).

    The metric must be one of :data:`ASHA_METRICS` (checked when the space is parsed, again here).
    With the sweep's resolved ``base`` config, the validation probe must be on
    (``validation.every_epochs`` > 0, at most ``asha.grace_period`` so that ASHA's first milestone
    sees a measured value) and have a labelled task (``validation.task``, else ``evaluate.tasks``;
    ``tasks_known=False`` skips this while the embedded world that supplies the task is not built
    yet)."""
    if space.asha is None:
        return
    _check_asha_metric(space.path, space.asha)
    if base is None:
        return
    validation = base.get("validation") or {}
    every = int(validation.get("every_epochs") or 0)
    if every <= 0:
        raise SpaceError(
            f"{space.path}: asha: ASHA ranks trials on {space.asha.metric}, the training stage's held-out "
            "validation probe, which is off (validation.every_epochs=0): set validation.every_epochs (e.g. 1) "
            "and validation.task (a labelled task spec; empty = the first of evaluate.tasks), in the space "
            "(fixed: {validation: {every_epochs: 1}}) or with --set validation.every_epochs=1")
    if every > space.asha.grace_period:
        raise SpaceError(
            f"{space.path}: asha.grace_period: {space.asha.grace_period} epoch(s) is before the first "
            f"validation probe (validation.every_epochs={every}); set validation.every_epochs <= "
            "asha.grace_period (1 probes every epoch)")
    if tasks_known and not (validation.get("task") or (base.get("evaluate") or {}).get("tasks")):
        raise SpaceError(
            f"{space.path}: asha: the validation probe needs a labelled task: set validation.task="
            "KIND:DATASET=ROOT (grammar: pacl_ray.evaluation.tasks) or evaluate.tasks (--downstream)")


# Result columns per task kind, as pacl_ray.core.metrics.task_metrics names them; "Acc" / "F1"
# stand for "Acc-C" / "F1-C" (C = class count or hierarchy level, known once the data is read).
KIND_COLUMNS = {"single": ("Acc", "F1"), "imagefolder": ("Acc", "F1"), "hierarchical": ("Acc", "F1"),
                "multilabel": ("mAP", "AUC"), "vad": ("MSE", "R2")}
SUFFIXED_COLUMNS = ("Acc", "F1")


def result_columns(base: dict) -> dict[str, tuple[str, ...]]:
    """The result-column prefixes of a sweep's downstream evaluation, from its resolved ``base``
    config: ``{"<task>": ("Acc", "F1"), ...}`` with ``<task>`` named as
    :func:`pacl_ray.sweeps.driver.flatten_rows` names it (display name, ``-<protocol>`` for
    fine-tuning / zero-shot, ``[<prompt>]`` per zero-shot prompt). Empty when no task is set.
    Raises :class:`pacl_ray.evaluation.tasks.TaskSpecError` for a malformed task spec."""
    from pacl_ray.evaluation.tasks import expand_tasks, parse_task

    evaluate = base.get("evaluate") or {}
    specs = expand_tasks([parse_task(str(t)) for t in evaluate.get("tasks") or []])
    protocols = [p.strip() for p in str(evaluate.get("protocol") or "linear").split(",") if p.strip()]
    out: dict[str, tuple[str, ...]] = {}
    for spec in specs:
        columns = KIND_COLUMNS.get(spec.kind, ())
        name = spec.display.replace("/", "_")
        for protocol in protocols:
            if protocol == "linear":
                out[name] = columns
            elif protocol == "zeroshot":
                out[f"{name}-zeroshot"] = columns
                for prompt in evaluate.get("prompts") or []:
                    out[f"{name}-zeroshot[{prompt}]".replace("/", "_")] = columns
            else:
                out[f"{name}-{protocol}"] = columns
    return out


def metric_matches(name: str, columns: dict[str, tuple[str, ...]]) -> bool:
    """Whether a space's ``metric.name`` names a result column: ``<task>/<column>`` with ``<task>`` a
    key of ``columns`` (:func:`result_columns`) and ``<column>`` one of its columns, where
    ``Acc`` / ``F1`` also match ``Acc-C`` / ``F1-C`` for any C (the prefix matching of
    :func:`pacl_ray.sweeps.report.resolve_metric`)."""
    task, _, column = name.rpartition("/")
    allowed = columns.get(task, ())
    return column in allowed or any(column.startswith(f"{c}-") and len(column) > len(c) + 1
                                    for c in allowed if c in SUFFIXED_COLUMNS)


def check_metric(space: SweepSpace, base: dict) -> None:
    """Refuse a ``metric.name`` that will not be a result column, before any trial runs
    (SpaceError naming the space file, the metric and the valid names). A no-op without a
    metric or while the downstream tasks are not known yet (``evaluate.tasks`` empty: the
    embedded world supplies them once built)."""
    if space.metric is None:
        return
    columns = result_columns(base)
    if not columns or metric_matches(space.metric.name, columns):
        return
    valid = ", ".join(f"{task}/{c}-C" if c in SUFFIXED_COLUMNS else f"{task}/{c}"
                      for task, cols in columns.items() for c in cols)
    raise SpaceError(f"{space.path}: metric.name: {space.metric.name!r} is not a result column of the downstream "
                     f"tasks; valid: {valid} (C = the class count, e.g. Acc-4; '<task>/Acc' matches any C)")


def _parse_rows(path: str, mode: str, data: Any, search: dict) -> tuple:
    """The ``rows:`` list of a ``mode: rows`` space (see the module docstring)."""
    if mode != "rows":
        if data is not None:
            raise SpaceError(f"{path}: rows: only allowed with mode: rows (mode is {mode})")
        return ()
    if search:
        raise SpaceError(f"{path}: search: not allowed with mode: rows; put each configuration in rows")
    if not isinstance(data, list) or not data:
        raise SpaceError(f"{path}: rows: expected a non-empty list of {{name, set, labels}} mappings, got {data!r}")
    rows, seen = [], set()
    for i, entry in enumerate(data):
        where = f"{path}: rows[{i}]"
        if not isinstance(entry, dict):
            raise SpaceError(f"{where}: expected a mapping with name and set, got {entry!r}")
        unknown = sorted(set(entry) - set(ROW_KEYS))
        if unknown:
            raise SpaceError(f"{where}.{unknown[0]}: unknown key; "
                             f"{config_mod.close_keys('', unknown[0], ROW_KEYS, 'of a row', config_keys=False)}")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise SpaceError(f"{where}.name: expected a non-empty string, got {name!r}")
        if name in seen:
            raise SpaceError(f"{where}.name: {name!r} is used by an earlier row")
        seen.add(name)
        labels = entry.get("labels") or {}
        if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise SpaceError(f"{where}.labels: expected a mapping of column -> text, got {labels!r}")
        rows.append(Row(name, _parse_overrides(f"{where}.set", entry.get("set")), dict(labels)))
    return tuple(rows)


def _parse_seeds(path: str, seeds: Any, search_seed: Any) -> tuple:
    """The seed axis from ``seeds: [0, 1, 2]`` or ``search: {seed: {grid: [0, 1, 2]}}``: distinct
    integers >= 0 (the training seed, config key ``seed``)."""
    if seeds is not None and search_seed is not None:
        raise SpaceError(f"{path}: seeds: give the seed axis once (seeds, or search.seed), not both")
    where = f"{path}: seeds"
    if search_seed is not None:
        where = f"{path}: search.seed"
        if not isinstance(search_seed, dict) or set(search_seed) != {"grid"}:
            raise SpaceError(f"{where}: the seed axis is a grid, e.g. {{grid: [0, 1, 2]}}; got {search_seed!r}")
        seeds = search_seed["grid"]
    if seeds is None:
        return ()
    if not isinstance(seeds, list) or not seeds:
        raise SpaceError(f"{where}: expected a non-empty list of integer seeds, got {seeds!r}")
    for i, seed in enumerate(seeds):
        _check_number(f"{where}[{i}]", seed, integer=True)
    if len(set(seeds)) != len(seeds):
        raise SpaceError(f"{where}: repeated seeds in {seeds!r}")
    return tuple(seeds)


def _is_section(key: str) -> bool:
    return config_mod.is_section(key)


def _stem(path: str) -> str:
    import os

    base = os.path.basename(path)
    for suffix in (".yaml", ".yml"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base or "sweep"


def load_space(path: str) -> SweepSpace:
    """Read and validate a space file (local path or pyarrow URI)."""
    from pacl_ray.formats import storage

    try:
        text = storage.read_text(path)
    except (FileNotFoundError, OSError) as err:
        raise SpaceError(f"{path}: cannot read the space file ({err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpaceError(f"{path}: not valid YAML: {err}") from None
    return parse_space(data, path)


# --------------------------------------------------------------------------- expansion


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _values(domain: Domain, num_samples: int, rng: random.Random) -> list:
    if domain.kind == "grid":
        return list(domain.values)
    return [domain.sample(rng) for _ in range(num_samples)]


def expand_trials(space: SweepSpace, base: dict) -> list[Trial]:
    """The sweep's trials, in a stable order, given the resolved base config (nested dict).

    one_at_a_time: the adopted trial first (every key at its ``base`` value), then each key's
    other values alone; values equal to the adopted one are the shared adopted trial.
    product: every combination. rows: one trial per row, in file order, named by the row.
    Baselines come last. Trial names are unique."""
    rng = random.Random(space.seed)
    trials: list[Trial] = []
    if space.mode == "one_at_a_time":
        trials.append(Trial("adopted"))
        for key, domain in space.search.items():
            adopted = get_dotted(base, key)
            for value in _values(domain, space.num_samples, rng):
                if _same(value, adopted):
                    continue
                trials.append(Trial(f"{key}={format_value(value)}", {key: value}))
    elif space.mode == "rows":
        trials.extend(Trial(row.name, dict(row.overrides)) for row in space.rows)
    else:
        grid_keys = [k for k, d in space.search.items() if not d.is_random]
        random_keys = [k for k, d in space.search.items() if d.is_random]
        grids = [list(space.search[k].values) for k in grid_keys]
        for _ in range(space.num_samples):
            for combo in itertools.product(*grids):
                varied = dict(zip(grid_keys, combo))
                for key in random_keys:
                    varied[key] = space.search[key].sample(rng)
                varied = {k: varied[k] for k in space.search}  # file order
                name = ",".join(f"{k}={format_value(v)}" for k, v in varied.items()) or "base"
                trials.append(Trial(name, varied))
    for name, overrides in space.baselines.items():
        trials.append(Trial(f"baseline:{name}", {}, name, dict(overrides)))
    trials = _unique_names(trials)
    seeds = space.seed_values(base)
    if seeds:  # the seed axis: every row repeated per seed, averaged back into one row
        trials = [Trial(f"{t.name}@seed={seed}", t.varied, t.baseline, t.baseline_overrides, seed, t.name)
                  for t in trials for seed in seeds]
    return trials


def _unique_names(trials: list[Trial]) -> list[Trial]:
    seen: dict[str, int] = {}
    out = []
    for trial in trials:
        count = seen.get(trial.name, 0)
        seen[trial.name] = count + 1
        if count:
            trial = Trial(f"{trial.name}#{count + 1}", trial.varied, trial.baseline, trial.baseline_overrides,
                          trial.seed, trial.repeat_of)
        out.append(trial)
    return out
