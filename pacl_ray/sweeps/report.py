"""The sweep report: the paper's Table-5 layout (Markdown + CSV), one plot per searched key, the
best config and ``trials.json`` (:func:`write_report`), from each trial's outcome.

Rows repeated for the same value (a sweep over seeds) are merged into mean ± spread
(:func:`merge_repeats`); an axis searched at one value gets no plot.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from pacl_ray import config as config_mod
from pacl_ray.formats import storage
from pacl_ray.sweeps.spaces import SweepSpace, Trial, format_value, get_dotted


@dataclass
class TrialOutcome:
    trial: Trial
    metrics: dict = field(default_factory=dict)  # "<task>/<col>" -> value
    backbone: str = ""
    error: str = ""


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
    by_name = {o.trial.name: o for o in outcomes}
    rows: list[dict] = []

    def row(section: str, value: str, outcome: TrialOutcome | None, adopted: bool = False,
            metrics: dict | None = None) -> dict:
        return {
            "hyperparameter": section, "value": value, "adopted": adopted,
            "trial": outcome.trial.name if outcome else "",
            "metrics": dict(metrics if metrics is not None else (outcome.metrics if outcome else {})),
            "backbone": outcome.backbone if outcome else "",
            "error": outcome.error if outcome else "",
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


def merge_repeats(rows: list[dict]) -> list[dict]:
    """Rows with the same (hyperparameter, value) -- a sweep repeated over seeds -- merged into one
    whose ``metrics`` are the means, ``spread`` the sample standard deviations and ``n`` the
    number of finished repeats per column; order is first appearance. Single rows get n = 1."""
    merged: dict[tuple, dict] = {}
    samples: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        key = (r["hyperparameter"], r["value"])
        if key not in merged:
            merged[key] = {**r, "trials": [r["trial"]] if r["trial"] else [], "errors": [r["error"]] if r["error"] else []}
            samples[key] = {}
        else:
            merged[key]["trials"] += [r["trial"]] if r["trial"] else []
            merged[key]["errors"] += [r["error"]] if r["error"] else []
        for column, value in r["metrics"].items():
            samples[key].setdefault(column, []).append(float(value))
    out = []
    for key, r in merged.items():
        values = samples[key]
        r["metrics"] = {c: sum(v) / len(v) for c, v in values.items()}
        r["spread"] = {c: (sum((x - r["metrics"][c]) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0
                       for c, v in values.items()}
        r["n"] = max((len(v) for v in values.values()), default=0)
        r["trial"] = ";".join(r.pop("trials"))
        r["error"] = "; ".join(dict.fromkeys(r.pop("errors")))
        out.append(r)
    return out


def _sort_key(value: Any) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _fmt_metric(value: Any) -> str:
    if value is None or value == "":
        return "-"
    return f"{float(value):.2f}"  # evaluate reports percentages; the paper's precision


def results_markdown(rows: list[dict], columns: list[str]) -> str:
    """The table as Markdown: hyperparameter | value | <task>/<metric> ..."""
    header = ["hyperparameter", "value"] + columns
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    previous = None
    for r in rows:
        section = r["hyperparameter"] if r["hyperparameter"] != previous else ""
        previous = r["hyperparameter"]
        cells = [_fmt_metric(r["metrics"].get(c)) for c in columns]
        if r.get("n", 1) > 1:  # repeats (seeds): mean ± sample standard deviation (n)
            cells = [cell if cell == "-" else f"{cell} ± {r['spread'][c]:.2f} (n={r['n']})"
                     for cell, c in zip(cells, columns)]
        if r["error"] and not r["metrics"]:
            cells = [f"failed: {r['error'][:40]}"] + ["-"] * (len(columns) - 1) if columns else []
        lines.append("| " + " | ".join([section, r["value"]] + cells) + " |")
    return "\n".join(lines) + "\n"


def results_csv(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    repeated = any(r.get("n", 1) > 1 for r in rows)
    spread = [f"{c} std" for c in columns] + ["n"] if repeated else []
    writer.writerow(["hyperparameter", "value", "adopted", "trial"] + columns + spread + ["backbone", "error"])
    for r in rows:
        extra = [r["spread"].get(c, "") for c in columns] + [r.get("n", "")] if repeated else []
        writer.writerow([r["hyperparameter"], r["value"], r["adopted"], r["trial"]]
                        + [r["metrics"].get(c, "") for c in columns] + extra + [r["backbone"], r["error"]])
    return buffer.getvalue()


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
    result_grid: Any = None  # Tune's ResultGrid (configs hold the hyperparameters)


def write_report(space: SweepSpace, base: dict, trial_configs: dict[str, dict],
                 outcomes: list[TrialOutcome], sweep_dir: str, initial: dict | None = None) -> SweepReport:
    """Table (Markdown + CSV), one plot per searched key, best config and trials.json."""
    columns = metric_columns(outcomes, initial)
    metric = resolve_metric(space.metric.name, columns) if space.metric else default_metric(columns)
    if space.metric and not metric and columns:
        metric = default_metric(columns)
        print(f"[tune] warning: metric {space.metric.name!r} is not a result column "
              f"({', '.join(columns)}); using {metric!r}", file=sys.stderr)
    mode = space.metric.mode if space.metric else "max"
    rows = merge_repeats(table_rows(space, base, outcomes, initial))
    markdown, csv_text = results_markdown(rows, columns), results_csv(rows, columns)
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

    best = best_outcome(outcomes, metric, mode) if metric else None
    best_yaml = ""
    if best is not None:
        best_yaml = config_mod.dump_config(config_mod.from_dict(trial_configs[best.trial.name]))
        storage.write_text(storage.join(sweep_dir, "best_config.yaml"), best_yaml)
    trials_json = [
        {**o.trial.to_dict(), "metrics": o.metrics, "backbone_checkpoint": o.backbone, "error": o.error}
        for o in outcomes
    ]
    storage.write_text(storage.join(sweep_dir, "trials.json"),
                       json.dumps({"metric": metric, "mode": mode, "initial": initial,
                                   "best": best.trial.name if best else None, "trials": trials_json},
                                  indent=2, default=str))
    return SweepReport(sweep_dir, markdown, csv_text, best, best_yaml, metric, plots)
