"""The Table 1 layout of evaluation rows (Markdown and CSV)."""

from __future__ import annotations

import csv
import io

from pacl_ray.evaluation import report


def _rows():
    base = {"task": "single:fi=/d", "dataset": "FI", "prompt": ""}
    return [
        {**base, "model": "resnet50", "protocol": "linear", "Acc-8": 57.72, "F1-8": 56.72},
        {**base, "model": "resnet50 + PACL", "protocol": "linear", "Acc-8": 59.5, "F1-8": 59.03},
        {"task": "vad:iaps=/i", "dataset": "IAPS", "prompt": "", "model": "resnet50", "protocol": "linear",
         "MSE": 2.13, "R2": 0.279},
        {"task": "vad:iaps=/i", "dataset": "IAPS", "prompt": "", "model": "resnet50 + PACL",
         "protocol": "linear", "MSE": 1.982, "R2": 0.31},
        {**base, "model": "resnet50", "protocol": "finetune", "Acc-8": 65.14, "F1-8": 64.84},
    ]


def test_results_table_layout():
    markdown, table = report.results_table(_rows())
    lines = markdown.strip().splitlines()
    assert lines[0] == "| Model | Protocol | FI Acc-8 | FI F1-8 | IAPS MSE | IAPS R2 |"
    assert lines[2] == "| resnet50 | Linear Evaluation | 57.72 | 56.72 | 2.130 | 0.2790 |"
    # best per column within a protocol is bold; lower MSE is better
    assert lines[3] == "| resnet50 + PACL | Linear Evaluation | **59.50** | **59.03** | **1.982** | **0.3100** |"
    assert lines[4] == "| resnet50 | Fine-tuning | 65.14 | 64.84 | - | - |"
    parsed = list(csv.reader(io.StringIO(table)))
    assert parsed[0] == ["Model", "Protocol", "FI Acc-8", "FI F1-8", "IAPS MSE", "IAPS R2"]
    assert float(parsed[2][2]) == 59.5 and parsed[3][4] == ""


def test_results_table_prompt_column_and_colliding_datasets():
    rows = [
        {"task": "vad:emotic=/a", "dataset": "Emotic", "model": "m", "protocol": "linear", "MSE": 1.0, "R2": 0.1},
        {"task": "vad:emotic=/b", "dataset": "Emotic", "model": "m", "protocol": "linear", "MSE": 2.0, "R2": 0.2},
        {"task": "single:fi=/d", "dataset": "FI", "model": "m", "protocol": "zeroshot", "prompt": "p {}",
         "Acc-8": 30.0, "F1-8": 20.0},
    ]
    markdown, _ = report.results_table(rows)
    header = markdown.splitlines()[0]
    assert "| Prompt |" in header and "Emotic MSE" in header and "vad:emotic=/b MSE" in header
