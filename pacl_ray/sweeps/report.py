"""The sweep report: the paper's Table-5 layout (Markdown + CSV), one plot per searched key, the
best config and ``trials.json`` (:func:`write_report`), from each trial's outcome.

``results.md`` follows the space's ``layout`` (:func:`layout_markdown`): ``table5`` (default; one
block per searched key), ``table4`` (one row per space row under its labels, e.g. Partition and
Sample Usage, after the initial weights), ``table1`` / ``table2`` (the paper's columns in its order,
one block per protocol; :mod:`pacl_ray.evaluation.report`). ``results.csv`` keeps every value at
full precision whatever the layout.

On a seed axis the trials of one row are averaged into mean ± sample standard deviation
(:func:`aggregate_seeds`); an axis searched at one value gets no plot.
"""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from pacl_ray import config as config_mod
from pacl_ray.evaluation.report import LayoutRow, markdown_table, paper_table
from pacl_ray.formats import storage
from pacl_ray.sweeps.spaces import SweepSpace, Trial, format_value, get_dotted


@dataclass
class TrialOutcome:
    trial: Trial
    metrics: dict = field(default_factory=dict)  # "<task>/<col>" -> value (the mean over seeds)
    backbone: str = ""
    error: str = ""
    spread: dict = field(default_factory=dict)  # "<task>/<col>" -> sample std over seeds (seed axis)
    seeds: list = field(default_factory=list)  # the seeds averaged into this row (seed axis)
    members: list = field(default_factory=list)  # their trial names
    # seconds from the trial's start to its first training step (None: it trained nothing, e.g. cached)
    start_to_first_step_s: Optional[float] = None


def aggregate_seeds(outcomes: list[TrialOutcome]) -> list[TrialOutcome]:
    """One outcome per results row: the trials of a seed axis (``Trial.repeat_of``) are averaged
    into one outcome named after their row, with ``metrics`` the mean and ``spread`` the sample
    standard deviation (0 for a single seed) of each metric over the seeds that report it.
    Outcomes without a seed pass through unchanged; order follows first appearance."""
    groups: dict[str, list[TrialOutcome]] = {}
    for outcome in outcomes:
        groups.setdefault(outcome.trial.group, []).append(outcome)
    out = []
    for name, members in groups.items():
        if len(members) == 1 and members[0].trial.seed is None:
            out.append(members[0])
            continue
        first = members[0].trial
        trial = Trial(name, first.varied, first.baseline, first.baseline_overrides)
        keys = list(dict.fromkeys(k for m in members for k in m.metrics))
        metrics, spread = {}, {}
        for key in keys:
            values = [float(m.metrics[key]) for m in members if m.metrics.get(key) is not None]
            if values:
                metrics[key] = statistics.fmean(values)
                spread[key] = statistics.stdev(values) if len(values) > 1 else 0.0
        failed = [m for m in members if m.error]
        error = ""
        if failed:
            error = f"{len(failed)} of {len(members)} seeds failed: {failed[0].error}"
        starts = [m.start_to_first_step_s for m in members if m.start_to_first_step_s is not None]
        out.append(TrialOutcome(trial, metrics, next((m.backbone for m in members if m.backbone), ""), error,
                                spread, [m.trial.seed for m in members], [m.trial.name for m in members],
                                statistics.fmean(starts) if starts else None))
    return out


def metric_columns(outcomes: list[TrialOutcome], initial: dict | None = None) -> list[str]:
    """Metric columns in first-seen order, grouped by task (accuracy before F1 as evaluated)."""
    seen: dict[str, None] = {}
    for metrics in [initial or {}] + [o.metrics for o in outcomes]:
        for key in metrics:
            if "/" in key:
                seen.setdefault(key, None)
    tasks: dict[str, list[str]] = {}
    for key in seen:
        tasks.setdefault(key.split("/", 1)[0], []).append(key)
    return [key for keys in tasks.values() for key in keys]


def default_metric(columns: list[str]) -> str:
    """The first accuracy column when the space names no metric."""
    for column in columns:
        if column.split("/", 1)[1].lower().startswith("acc"):
            return column
    return columns[0] if columns else ""


def resolve_metric(name: str, columns: list[str]) -> str:
    """The result column for a space's metric: exact, or ``"<task>/Acc"`` matching ``"<task>/Acc-C"``
    whatever the class count C; "" when no column matches."""
    if name in columns:
        return name
    return next((c for c in columns if c.startswith(f"{name}-")), "")


def table_rows(space: SweepSpace, base: dict, outcomes: list[TrialOutcome],
               initial: dict | None = None) -> list[dict]:
    """Rows of the Table-5 layout: one block per searched key (its values in order, the adopted
    value marked), then baselines and the initial backbone."""
    outcomes = aggregate_seeds(outcomes)  # a seed axis: one row per trial, mean and spread
    by_name = {o.trial.name: o for o in outcomes}
    rows: list[dict] = []

    def row(section: str, value: str, outcome: TrialOutcome | None, adopted: bool = False,
            metrics: dict | None = None) -> dict:
        return {
            "hyperparameter": section, "value": value, "adopted": adopted,
            "trial": outcome.trial.name if outcome else "",
            "metrics": dict(metrics if metrics is not None else (outcome.metrics if outcome else {})),
            "spread": dict(outcome.spread) if outcome else {},
            "seeds": list(outcome.seeds) if outcome else [],
            "backbone": outcome.backbone if outcome else "",
            "error": outcome.error if outcome else "",
            "start_to_first_step_s": outcome.start_to_first_step_s if outcome else None,
        }

    if space.mode == "one_at_a_time":
        adopted_outcome = by_name.get("adopted")
        for key in space.search:
            adopted_value = get_dotted(base, key)
            entries = [(adopted_value, adopted_outcome, True)]
            entries += [(o.trial.varied[key], o, False) for o in outcomes if set(o.trial.varied) == {key}]
            entries.sort(key=lambda e: _sort_key(e[0]))
            for value, outcome, adopted in entries:
                label = format_value(value) + (" (adopted)" if adopted else "")
                rows.append(row(key, label, outcome, adopted))
    else:
        for outcome in outcomes:
            if outcome.trial.baseline:
                continue
            rows.append(row("+".join(space.search) or "config", outcome.trial.name, outcome))
    for outcome in outcomes:
        if outcome.trial.baseline:
            overrides = ", ".join(f"{k}={format_value(v)}" for k, v in outcome.trial.baseline_overrides.items())
            rows.append(row("baseline", f"{outcome.trial.baseline} ({overrides})", outcome))
    if initial is not None:
        rows.append(row("initial backbone", "before training", None, metrics=initial))
    return rows


def _sort_key(value: Any) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _fmt_metric(value: Any, spread: Any = None) -> str:
    if value is None or value == "":
        return "-"
    text = f"{float(value):.2f}"  # evaluate reports percentages; the paper's precision
    return text if spread is None else f"{text} ± {float(spread):.2f}"  # mean ± std over seeds


STARTUP_COLUMN = "first step (s)"  # the trial's start to its first training step (issue #21)


def _error_cell(error: str) -> str:
    """A row without values: "interrupted" (the sweep was stopped; not a failure) or "failed: ..."."""
    return error if error == "interrupted" else f"failed: {error[:40]}"


def results_markdown(rows: list[dict], columns: list[str]) -> str:
    """The table as Markdown: hyperparameter | value | <task>/<metric> ... (on a seed axis each
    cell is ``mean ± std`` over the seeds, and a ``seeds`` column counts them; when a trial trained
    in this sweep, a last column gives its seconds from the trial's start to its first training
    step, the mean over seeds on a seed axis)."""
    with_seeds = any(r.get("seeds") for r in rows)
    with_startup = any(r.get("start_to_first_step_s") is not None for r in rows)
    header = ["hyperparameter", "value"] + columns + (["seeds"] if with_seeds else []) + (
        [STARTUP_COLUMN] if with_startup else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    previous = None
    for r in rows:
        section = r["hyperparameter"] if r["hyperparameter"] != previous else ""
        previous = r["hyperparameter"]
        cells = [_fmt_metric(r["metrics"].get(c), r.get("spread", {}).get(c)) for c in columns]
        if r["error"] and not r["metrics"]:
            cells = [_error_cell(r["error"])] + ["-"] * (len(columns) - 1) if columns else []
        if with_seeds:
            cells.append(str(len(r.get("seeds") or [])) if r.get("seeds") else "-")
        if with_startup:
            start = r.get("start_to_first_step_s")
            cells.append("-" if start is None else f"{float(start):.1f}")
        lines.append("| " + " | ".join([section, r["value"]] + cells) + " |")
    return "\n".join(lines) + "\n"


def _mark_csv(csv_text: str, incomplete: str) -> str:
    """A last ``incomplete`` column saying why every row may be partial."""
    rows = list(csv.reader(io.StringIO(csv_text)))
    out = io.StringIO()
    writer = csv.writer(out)
    for i, row in enumerate(rows):
        writer.writerow(row + ["incomplete" if i == 0 else incomplete])
    return out.getvalue()


def results_csv(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    with_seeds = any(r.get("seeds") for r in rows)  # a seed axis: std columns and the seeds
    spread_columns = [f"{c} std" for c in columns] + ["seeds"] if with_seeds else []
    writer.writerow(["hyperparameter", "value", "adopted", "trial"] + columns + spread_columns
                    + ["start_to_first_step_s", "backbone", "error"])
    for r in rows:
        spreads = ([r.get("spread", {}).get(c, "") for c in columns]
                   + [" ".join(str(s) for s in r.get("seeds") or [])]) if with_seeds else []
        writer.writerow([r["hyperparameter"], r["value"], r["adopted"], r["trial"]]
                        + [r["metrics"].get(c, "") for c in columns] + spreads
                        + [_or_blank(r.get("start_to_first_step_s")), r["backbone"], r["error"]])
    return buffer.getvalue()


# --------------------------------------------------------------------------- paper layouts

# a flattened result key of a protocol other than linear: "<dataset>-finetune/<metric>",
# "<dataset>-zeroshot[<prompt>]/<metric>" (pacl_ray.sweeps.driver.flatten_rows)
_PROTOCOL_KEY = re.compile(r"^(?P<dataset>.+)-(?P<protocol>finetune|zeroshot)(?P<prompt>\[.*\])?/(?P<metric>[^/]+)$")
INITIAL_LABEL = "initial backbone"


def split_protocol(key: str) -> tuple[str, str]:
    """A sweep result key -> (protocol, ``"<dataset>/<metric>"``): ``"FI-finetune/Acc-8"`` ->
    ``("finetune", "FI/Acc-8")``; a zero-shot prompt stays with its protocol (``"zeroshot[p]"``);
    a key without a protocol suffix is linear evaluation."""
    match = _PROTOCOL_KEY.match(key)
    if not match:
        return "linear", key
    return match["protocol"] + (match["prompt"] or ""), f"{match['dataset']}/{match['metric']}"


def _by_protocol(cells: tuple, metrics: dict, spread: dict, error: str) -> list[LayoutRow]:
    """One LayoutRow per protocol the metrics hold (linear first when present; none -> one linear row)."""
    rows: dict[str, LayoutRow] = {}
    for key, value in metrics.items():
        protocol, plain = split_protocol(key)
        row = rows.setdefault(protocol, LayoutRow(cells, {}, {}, protocol, error))
        row.values[plain] = value
        if key in spread:
            row.spread[plain] = spread[key]
    return list(rows.values()) or [LayoutRow(cells, {}, {}, "linear", error)]


def _ordered(outcomes: list[TrialOutcome]) -> list[TrialOutcome]:
    """Searched trials in sweep order, then baselines."""
    return [o for o in outcomes if not o.trial.baseline] + [o for o in outcomes if o.trial.baseline]


def paper_layout_rows(outcomes: list[TrialOutcome], initial: dict | None = None) -> list[LayoutRow]:
    """The results frame of Tables 1 and 2: the initial backbone, each trial (seeds averaged), then
    baselines, labelled by trial name; one row per model in every protocol block any model has
    (a model a protocol did not evaluate gets a row of ``-`` there, as in the paper's blocks)."""
    models = []
    if initial is not None:
        models.append(_by_protocol((INITIAL_LABEL,), initial, {}, ""))
    for outcome in _ordered(aggregate_seeds(outcomes)):
        models.append(_by_protocol((outcome.trial.name,), outcome.metrics, outcome.spread, outcome.error))
    protocols = list(dict.fromkeys(row.protocol for rows in models for row in rows))
    frame = []
    for protocol in protocols:
        for rows in models:
            found = [row for row in rows if row.protocol == protocol]
            frame.append(found[0] if found else LayoutRow(rows[0].cells, {}, {}, protocol, rows[0].error))
    return frame


def table4_markdown(space: SweepSpace, outcomes: list[TrialOutcome], initial: dict | None = None) -> str:
    """The paper's Table 4 layout: one column per row label (``labels`` of the space's rows, in
    first-seen order, title-cased: Partition, Sample Usage), the "Initial weight" row first, each
    row's trial (mean ± std on a seed axis) under its labels in space order, then baselines by
    name; one column per result (e.g. UnbiasedEmo Acc-6, F1-6), ``-`` where missing."""
    labels = {row.name: row.labels for row in space.rows}
    keys = list(dict.fromkeys(k for row in space.rows for k in row.labels)) or ["row"]
    lead = [k.title() for k in keys]
    frame = []
    if initial is not None:
        frame.append(LayoutRow(("Initial weight",) + ("",) * (len(keys) - 1), dict(initial)))
    for outcome in _ordered(aggregate_seeds(outcomes)):
        row_labels = labels.get(outcome.trial.name)
        if row_labels:
            cells = tuple(row_labels.get(k, "-") for k in keys)
        else:  # a baseline (or a row without labels): its name in the first column
            cells = (outcome.trial.name,) + ("",) * (len(keys) - 1)
        frame.append(LayoutRow(cells, dict(outcome.metrics), dict(outcome.spread), error=outcome.error))
    columns = [(c.replace("/", " ", 1), c) for c in metric_columns(outcomes, initial)]
    return markdown_table(lead, frame, columns)


def layout_markdown(space: SweepSpace, base: dict, outcomes: list[TrialOutcome], initial: dict | None = None) -> str:
    """``results.md`` in the space's layout (``space.layout``; see the module docstring)."""
    if space.layout == "table4":
        return table4_markdown(space, outcomes, initial)
    if space.layout in ("table1", "table2"):
        return paper_table(space.layout, paper_layout_rows(outcomes, initial))
    return results_markdown(table_rows(space, base, outcomes, initial), metric_columns(outcomes, initial))


def _or_blank(value: Any) -> Any:
    return "" if value is None else value


def plot_hyperparameter(key: str, rows: list[dict], columns: list[str], metric: str,
                        reference: dict[str, float], log_scale: bool) -> bytes:
    """PNG of every accuracy column (and the sweep metric, bold) against one key's values, with
    baselines and the initial backbone as dashed lines of the sweep metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    block = [r for r in rows if r["hyperparameter"] == key and r["metrics"]]
    raw = [r["value"].replace(" (adopted)", "") for r in block]
    numeric = all(_is_number(v) for v in raw)
    xs: list = [float(v) for v in raw] if numeric else list(range(len(raw)))
    shown = [c for c in columns if c == metric or c.split("/", 1)[1].lower().startswith("acc")]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    for column in shown:
        ys = [r["metrics"].get(column, float("nan")) for r in block]
        ax.plot(xs, ys, marker="o", linewidth=2.4 if column == metric else 1.2, label=column)
    for r in block:
        if r["adopted"] and metric in r["metrics"]:
            ax.scatter([xs[block.index(r)]], [r["metrics"][metric]], s=120, facecolors="none",
                       edgecolors="black", zorder=5, label="adopted")
    for (name, value), style in zip(reference.items(), ["--", ":", "-.", (0, (5, 1))] * 4):
        ax.axhline(value, linestyle=style, color="gray", linewidth=1.0, label=f"{name} ({metric})")
    if numeric and log_scale and all(x > 0 for x in xs):
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(xs, raw, rotation=30, ha="right")
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs {key}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def best_outcome(outcomes: list[TrialOutcome], metric: str, mode: str) -> Optional[TrialOutcome]:
    """The best searched trial by ``metric`` (baselines are comparisons, not candidates)."""
    best = None
    for outcome in outcomes:
        value = outcome.metrics.get(metric)
        if outcome.trial.baseline or value is None:
            continue
        if best is None or (value > best.metrics[metric] if mode == "max" else value < best.metrics[metric]):
            best = outcome
    return best


@dataclass
class SweepReport:
    sweep_dir: str
    markdown: str
    csv: str
    best: Optional[TrialOutcome]
    best_config_yaml: str
    metric: str
    plots: list[str]


def write_report(space: SweepSpace, base: dict, trial_configs: dict[str, dict],
                 outcomes: list[TrialOutcome], sweep_dir: str, initial: dict | None = None,
                 incomplete: str = "") -> SweepReport:
    """Table (Markdown + CSV), one plot per searched key, best config and trials.json.

    ``incomplete`` (e.g. "interrupted, 1 of 3 trials finished"): the sweep did not finish, and
    nothing may look as if it had: results.md starts with ``INCOMPLETE: <incomplete>``, trials.json
    carries ``"incomplete"``, results.csv has an ``incomplete`` column, and no best config is
    chosen (no best_config.yaml; one left by an earlier run of this sweep is removed)."""
    columns = metric_columns(outcomes, initial)
    metric = resolve_metric(space.metric.name, columns) if space.metric else default_metric(columns)
    if space.metric and not metric and columns:
        metric = default_metric(columns)
        print(f"[tune] warning: metric {space.metric.name!r} is not a result column "
              f"({', '.join(columns)}); using {metric!r}", file=sys.stderr)
    mode = space.metric.mode if space.metric else "max"
    rows = table_rows(space, base, outcomes, initial)
    markdown, csv_text = layout_markdown(space, base, outcomes, initial), results_csv(rows, columns)
    if incomplete:
        markdown = (f"**INCOMPLETE: {incomplete}.** Rows marked interrupted are not results; "
                    f"rerun the same command to resume the sweep.\n\n" + markdown)
        csv_text = _mark_csv(csv_text, incomplete)
    storage.write_text(storage.join(sweep_dir, "results.md"), markdown)
    storage.write_text(storage.join(sweep_dir, "results.csv"), csv_text)

    reference = {r["value"].split(" (")[0] if r["hyperparameter"] == "baseline" else r["hyperparameter"]:
                 r["metrics"][metric]
                 for r in rows if r["hyperparameter"] in ("baseline", "initial backbone") and metric in r["metrics"]}
    plots = []
    for key, domain in space.search.items():
        values = {r["value"].replace(" (adopted)", "") for r in rows if r["hyperparameter"] == key and r["metrics"]}
        if len(values) < 2 or not metric:
            continue  # a one-value axis is a lone point, not a curve
        uri = storage.join(sweep_dir, f"plot_{key.replace('.', '_')}.png")
        storage.write_bytes(uri, plot_hyperparameter(key, rows, columns, metric, reference, domain.log_scale))
        plots.append(uri)

    best = best_outcome(aggregate_seeds(outcomes), metric, mode) if metric and not incomplete else None
    best_yaml = ""
    if incomplete and storage.exists(storage.join(sweep_dir, "best_config.yaml")):
        fs, path = storage.resolve(storage.join(sweep_dir, "best_config.yaml"))
        fs.delete_file(path)
    if best is not None:
        # a seed axis' best row: the config of its first seed
        best_yaml = config_mod.dump_config(config_mod.from_dict(trial_configs[(best.members or [best.trial.name])[0]]))
        storage.write_text(storage.join(sweep_dir, "best_config.yaml"), best_yaml)
    trials_json = [
        {**o.trial.to_dict(), "metrics": o.metrics, "backbone_checkpoint": o.backbone, "error": o.error,
         "start_to_first_step_s": o.start_to_first_step_s}
        for o in outcomes
    ]
    storage.write_text(storage.join(sweep_dir, "trials.json"),
                       json.dumps({**({"incomplete": incomplete} if incomplete else {}),
                                   "metric": metric, "mode": mode, "initial": initial,
                                   "best": best.trial.name if best else None, "trials": trials_json},
                                  indent=2, default=str))
    return SweepReport(sweep_dir, markdown, csv_text, best, best_yaml, metric, plots)
