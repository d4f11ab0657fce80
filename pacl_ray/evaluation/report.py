"""The Table 1 layout of evaluation rows: Markdown (paper precision, best per column in bold) and
CSV (full precision), merged into ``rows.json`` / ``results.md`` / ``results.csv`` of an output
directory (local path or URI); and the paper's own tables (:data:`PAPER_COLUMNS`: Table 1's and
Table 2's columns in the paper's order) as ``table1.md`` / ``table2.md`` beside them.

The paper layouts are pure functions of a results frame, shared with the sweep report
(:mod:`pacl_ray.sweeps.report`): rows of leading cells and ``{"<dataset>/<metric>": value}``
(``dataset`` the task's display name, e.g. ``"FI-2/Acc-2"``), with an optional standard deviation
per value (a seed axis: the cell reads ``mean ± std``). A value the results do not hold is ``-``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from pacl_ray.core import metrics
from pacl_ray.evaluation.tasks import PROTOCOLS
from pacl_ray.formats import storage

METRIC_COLUMN = re.compile(r"^(Acc|F1)-\S+$|^(mAP|AUC|MSE|R2)$")
PROTOCOL_TITLES = {"linear": "Linear Evaluation", "finetune": "Fine-tuning", "zeroshot": "Zero-shot"}


def metric_columns(row: dict) -> list[str]:
    """The metric keys of an evaluation row (Acc-C, F1-C, mAP, AUC, MSE, R2), in row order."""
    return [k for k in row if METRIC_COLUMN.match(k)]


def _format(column: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column == "MSE":
        return f"{value:.3f}"
    if column == "R2":
        return f"{value:.4f}"
    return f"{value:.2f}"


def results_table(rows: Sequence[dict]) -> tuple[str, str]:
    """The Table 1 layout of result rows -> (Markdown, CSV).

    Rows of the table are (protocol, model[, prompt]) in protocol order (linear, finetune, zeroshot)
    and first appearance within; columns are ``"<dataset> <metric>"`` per task in first appearance
    (the task spec is used instead of the dataset name when two tasks would collide). Markdown
    shows paper precision and bolds the best value per column within a protocol; CSV has full
    precision."""
    tasks: dict[str, list[str]] = {}
    for row in rows:
        cols = tasks.setdefault(row["task"], [])
        cols.extend(c for c in metric_columns(row) if c not in cols)
    labels: dict[str, str] = {}
    taken: set[tuple[str, str]] = set()
    for task, cols in tasks.items():
        display = next(r["dataset"] for r in rows if r["task"] == task)
        if any((display, c) in taken for c in cols):
            display = task
        labels[task] = display
        taken.update((display, c) for c in cols)
    columns = [(task, c) for task, cols in tasks.items() for c in cols]
    headers = [f"{labels[t]} {c}" for t, c in columns]
    with_prompt = any(r.get("prompt") for r in rows)
    keys: list[tuple[str, str, str]] = []
    values: dict[tuple[str, str, str], dict] = {}
    for row in rows:
        key = (row["protocol"], row["model"], row.get("prompt") or "")
        if key not in values:
            keys.append(key)
            values[key] = {}
        for c in metric_columns(row):
            values[key][(row["task"], c)] = row[c]
    order = {p: i for i, p in enumerate(PROTOCOLS)}
    keys.sort(key=lambda k: order.get(k[0], len(order)))

    def best(protocol: str, column: tuple[str, str]):
        found = [values[k][column] for k in keys if k[0] == protocol and column in values[k]
                 and not (isinstance(values[k][column], float) and math.isnan(values[k][column]))]
        if len(found) < 2:
            return None
        return max(found) if metrics.metric_direction(column[1]) > 0 else min(found)

    lead = ["Model", "Protocol"] + (["Prompt"] if with_prompt else [])
    lines = ["| " + " | ".join(lead + headers) + " |", "|" + "---|" * (len(lead) + len(headers))]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(lead + headers)
    for key in keys:
        protocol, model, prompt = key
        cells, raw = [], []
        for column in columns:
            value = values[key].get(column)
            text = _format(column[1], value)
            if value is not None and value == best(protocol, column):
                text = f"**{text}**"
            cells.append(text)
            raw.append("" if value is None else repr(float(value)))
        head = [model, PROTOCOL_TITLES.get(protocol, protocol)] + ([prompt] if with_prompt else [])
        lines.append("| " + " | ".join(head + cells) + " |")
        writer.writerow(head + raw)
    return "\n".join(lines) + "\n", buffer.getvalue()


# --------------------------------------------------------------------------- the paper's tables


@dataclass(frozen=True)
class PaperColumn:
    """One column of a paper table: printed as ``"<group> <label>"``, filled from the result
    ``"<dataset>/<metric>"`` (the evaluated task's display name and metric column)."""

    group: str
    label: str
    dataset: str
    metric: str

    @property
    def header(self) -> str:
        return f"{self.group} {self.label}"

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.metric}"


def _columns(*groups: tuple[str, str, Sequence[str]]) -> tuple[PaperColumn, ...]:
    return tuple(PaperColumn(group, metric, dataset, metric)
                 for group, dataset, metrics in groups for metric in metrics)


# Table 1 (paper 4.4): single-label FI / Emotion-6 / UnbiasedEmo, hierarchical WebEmo (levels
# predicted together; 7 second-level classes, README "Deliberate differences"), multi-label Emotic,
# VAD Emotic and IAPS. Table 2 (4.5.1): FI-2 and FI, and WebEmo with each level trained alone
# (task ``levels:webemo``); its "Acc-6" is our 7-class second level.
PAPER_COLUMNS: dict[str, tuple[PaperColumn, ...]] = {
    "table1": _columns(
        ("FI", "FI", ("Acc-8", "F1-8")), ("Emotion-6", "Emotion-6", ("Acc-6", "F1-6")),
        ("UnbiasedEmo", "UnbiasedEmo", ("Acc-6", "F1-6")),
        ("WebEmo", "WebEmo", ("Acc-2", "F1-2", "Acc-7", "F1-7", "Acc-25", "F1-25")),
        ("Emotic", "Emotic", ("mAP", "AUC")), ("Emotic", "Emotic", ("MSE", "R2")), ("IAPS", "IAPS", ("MSE", "R2")),
    ),
    "table2": (
        PaperColumn("FI", "Acc-2", "FI-2", "Acc-2"), PaperColumn("FI", "Acc-8", "FI", "Acc-8"),
        PaperColumn("WebEmo", "Acc-2", "WebEmo-2", "Acc-2"), PaperColumn("WebEmo", "Acc-7", "WebEmo-7", "Acc-7"),
        PaperColumn("WebEmo", "Acc-25", "WebEmo-25", "Acc-25"),
    ),
}
# Table 1 lists every result after its own columns (no result is hidden); Table 2 is a fixed
# comparison of five accuracies (its "WebEmo Acc-2" would read like hierarchical WebEmo's).
PAPER_EXTRAS = {"table1": True, "table2": False}


@dataclass
class LayoutRow:
    """One row of a results frame: leading cells (model; or partition and sample usage), the
    protocol block it belongs to, ``{"<dataset>/<metric>": value}`` and the std over seeds of each
    (empty without a seed axis)."""

    cells: tuple
    values: dict
    spread: dict = field(default_factory=dict)
    protocol: str = "linear"
    error: str = ""


def format_cell(metric: str, value: Any, spread: Any = None) -> str:
    """A value at the paper's precision (MSE 3 decimals, R2 4, the rest 2), ``mean ± std`` with a
    spread, ``-`` when missing or not a number."""
    text = _format(metric, value)
    if text == "-" or spread is None or (isinstance(spread, float) and math.isnan(spread)):
        return text
    return f"{text} ± {_format(metric, spread)}"


def generic_columns(rows: Sequence[LayoutRow]) -> list[tuple[str, str]]:
    """(header, key) for every result key in first-seen order, header ``"<dataset> <metric>"``."""
    keys = list(dict.fromkeys(k for r in rows for k in r.values))
    return [(k.replace("/", " ", 1) if k.count("/") == 1 else k, k) for k in keys]


def paper_columns(layout: str, rows: Sequence[LayoutRow]) -> list[tuple[str, str]]:
    """(header, key) of a paper table: its columns in the paper's order (every one, filled or not),
    then, for Table 1, every other result key in first-seen order."""
    if layout not in PAPER_COLUMNS:
        raise ValueError(f"unknown paper layout {layout!r}; expected one of {', '.join(PAPER_COLUMNS)}")
    fixed = [(c.header, c.key) for c in PAPER_COLUMNS[layout]]
    if not PAPER_EXTRAS[layout]:
        return fixed
    taken = {key for _, key in fixed}
    return fixed + [(h, k) for h, k in generic_columns(rows) if k not in taken]


def markdown_table(lead: Sequence[str], rows: Sequence[LayoutRow], columns: Sequence[tuple[str, str]]) -> str:
    """Rows as Markdown: the leading cells, then one cell per (header, key) column
    (:func:`format_cell`). A failed row without values shows its error in the first column."""
    lines = ["| " + " | ".join(list(lead) + [h for h, _ in columns]) + " |", "|" + "---|" * (len(lead) + len(columns))]
    for row in rows:
        cells = [format_cell(k.rsplit("/", 1)[-1], row.values.get(k), row.spread.get(k)) for _, k in columns]
        if row.error and not row.values and cells:
            # "interrupted": a sweep stopped before the row ran (pacl_ray.sweeps.driver), not a failure
            cells = [row.error if row.error == "interrupted" else f"failed: {row.error[:40]}"] + ["-"] * (len(cells) - 1)
        lines.append("| " + " | ".join([str(c) for c in row.cells] + cells) + " |")
    return "\n".join(lines) + "\n"


def paper_table(layout: str, rows: Sequence[LayoutRow], lead: Sequence[str] = ("Model",)) -> str:
    """Table 1 or 2 as Markdown: a ``Protocol`` column naming each block once (linear evaluation,
    then fine-tuning, then the rest, as the paper's "Linear Evaluation:" / "Fine-tuning:" blocks),
    the rows' leading cells, then :func:`paper_columns`."""
    columns = paper_columns(layout, rows)
    order = {p: i for i, p in enumerate(PROTOCOLS)}
    protocols = sorted(dict.fromkeys(r.protocol for r in rows), key=lambda p: order.get(p, len(order)))
    body = []
    for protocol in protocols:
        for i, row in enumerate(r for r in rows if r.protocol == protocol):
            title = PROTOCOL_TITLES.get(protocol, protocol) if i == 0 else ""
            body.append(LayoutRow((title, *row.cells), row.values, row.spread, protocol, row.error))
    return markdown_table(["Protocol", *lead], body, columns)


def layout_rows(rows: Sequence[dict]) -> list[LayoutRow]:
    """Evaluation rows (one per task, protocol and prompt) -> one LayoutRow per (protocol, model,
    prompt), keyed ``"<dataset>/<metric>"`` (a zero-shot prompt joins the model's cell). Two tasks
    shown under one dataset name share its cells (the later one wins; ``results.md`` keeps both)."""
    out: dict[tuple, LayoutRow] = {}
    for row in rows:
        prompt = row.get("prompt") or ""
        key = (row["protocol"], row["model"], prompt)
        if key not in out:
            out[key] = LayoutRow((f"{row['model']} [{prompt}]" if prompt else row["model"],), {}, {}, row["protocol"])
        for c in metric_columns(row):
            out[key].values[f"{row['dataset']}/{c}"] = row[c]
    return list(out.values())


def _row_key(row: dict) -> tuple:
    return (row["model"], row["protocol"], row.get("prompt") or "", row["task"])


def write_results(out_dir: str, rows: Sequence[dict]) -> list[dict]:
    """Merge rows into ``out_dir/rows.json`` (same model, protocol, prompt and task replaced) and
    rewrite ``results.md`` / ``results.csv`` and the paper layouts ``table1.md`` / ``table2.md``;
    returns all rows now in ``out_dir``."""
    path = storage.join(out_dir, "rows.json")
    merged = json.loads(storage.read_text(path)) if storage.exists(path) else []
    new_keys = {_row_key(r) for r in rows}
    merged = [r for r in merged if _row_key(r) not in new_keys] + list(rows)
    storage.write_text(path, json.dumps(merged, indent=1, default=str))
    markdown, table_csv = results_table(merged)
    storage.write_text(storage.join(out_dir, "results.md"), markdown)
    storage.write_text(storage.join(out_dir, "results.csv"), table_csv)
    frame = layout_rows(merged)
    for layout in PAPER_COLUMNS:
        storage.write_text(storage.join(out_dir, f"{layout}.md"), paper_table(layout, frame))
    return merged
