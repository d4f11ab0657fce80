"""The Table 1 layout of evaluation rows: Markdown (paper precision, best per column in bold) and
CSV (full precision), merged into ``rows.json`` / ``results.md`` / ``results.csv`` of an output
directory (local path or URI)."""

from __future__ import annotations

import csv
import io
import json
import math
import re
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


def _row_key(row: dict) -> tuple:
    return (row["model"], row["protocol"], row.get("prompt") or "", row["task"])


def write_results(out_dir: str, rows: Sequence[dict]) -> list[dict]:
    """Merge rows into ``out_dir/rows.json`` (same model, protocol, prompt and task replaced) and
    rewrite ``results.md`` / ``results.csv``; returns all rows now in ``out_dir``."""
    path = storage.join(out_dir, "rows.json")
    merged = json.loads(storage.read_text(path)) if storage.exists(path) else []
    new_keys = {_row_key(r) for r in rows}
    merged = [r for r in merged if _row_key(r) not in new_keys] + list(rows)
    storage.write_text(path, json.dumps(merged, indent=1, default=str))
    markdown, table_csv = results_table(merged)
    storage.write_text(storage.join(out_dir, "results.md"), markdown)
    storage.write_text(storage.join(out_dir, "results.csv"), table_csv)
    return merged
