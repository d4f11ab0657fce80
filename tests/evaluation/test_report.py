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


def test_table2_layout_of_evaluation_rows():
    def row(model, protocol, dataset, **values):
        return {"task": f"single:{dataset}=/d", "dataset": dataset, "prompt": "", "model": model,
                "protocol": protocol, **values}

    rows = [
        row("resnet50", "linear", "FI-2", **{"Acc-2": 75.0, "F1-2": 74.0}),
        row("resnet50", "linear", "FI", **{"Acc-8": 57.72, "F1-8": 56.72}),
        row("resnet50", "linear", "WebEmo-2", **{"Acc-2": 66.25, "F1-2": 66.21}),
        row("resnet50", "linear", "WebEmo-7", **{"Acc-7": 41.08, "F1-7": 39.03}),
        row("resnet50", "linear", "WebEmo-25", **{"Acc-25": 24.94, "F1-25": 22.8}),
        row("resnet50", "linear", "WebEmo", **{"Acc-2": 60.0, "Acc-7": 30.0}),  # hierarchical: Table 1's
        row("resnet50 + PACL", "finetune", "FI", **{"Acc-8": 80.55, "F1-8": 80.28}),
    ]
    assert report.paper_table("table2", report.layout_rows(rows)) == (
        "| Protocol | Model | FI Acc-2 | FI Acc-8 | WebEmo Acc-2 | WebEmo Acc-7 | WebEmo Acc-25 |\n"
        "|---|---|---|---|---|---|---|\n"
        "| Linear Evaluation | resnet50 | 75.00 | 57.72 | 66.25 | 41.08 | 24.94 |\n"
        "| Fine-tuning | resnet50 + PACL | - | 80.55 | - | - | - |\n"
    )


def test_table1_layout_of_evaluation_rows_puts_the_papers_columns_first():
    rows = _rows() + [{"task": "imagefolder:toy=/t", "dataset": "toy", "prompt": "", "model": "resnet50",
                       "protocol": "linear", "Acc-2": 90.0, "F1-2": 89.0}]
    lines = report.paper_table("table1", report.layout_rows(rows)).splitlines()
    assert lines[0] == (
        "| Protocol | Model | FI Acc-8 | FI F1-8 | Emotion-6 Acc-6 | Emotion-6 F1-6 | UnbiasedEmo Acc-6 | "
        "UnbiasedEmo F1-6 | WebEmo Acc-2 | WebEmo F1-2 | WebEmo Acc-7 | WebEmo F1-7 | WebEmo Acc-25 | WebEmo F1-25 | "
        "Emotic mAP | Emotic AUC | Emotic MSE | Emotic R2 | IAPS MSE | IAPS R2 | toy Acc-2 | toy F1-2 |")
    dashes = " | ".join(["-"] * 14)
    assert lines[2:] == [
        f"| Linear Evaluation | resnet50 | 57.72 | 56.72 | {dashes} | 2.130 | 0.2790 | 90.00 | 89.00 |",
        f"|  | resnet50 + PACL | 59.50 | 59.03 | {dashes} | 1.982 | 0.3100 | - | - |",
        f"| Fine-tuning | resnet50 | 65.14 | 64.84 | {dashes} | - | - | - | - |",
    ]


def test_format_cell_precision_and_spread():
    assert report.format_cell("Acc-8", 59.499) == "59.50"
    assert report.format_cell("MSE", 2.8251, 0.0412) == "2.825 ± 0.041"
    assert report.format_cell("R2", 0.12671, 0.01) == "0.1267 ± 0.0100"
    assert report.format_cell("Acc-8", None, 1.0) == "-"
    assert report.format_cell("F1-8", float("nan")) == "-"


def test_write_results_writes_the_paper_layouts(tmp_path):
    report.write_results(str(tmp_path), _rows())
    table1 = (tmp_path / "table1.md").read_text()
    table2 = (tmp_path / "table2.md").read_text()
    assert table1 == report.paper_table("table1", report.layout_rows(_rows()))
    assert table2.splitlines()[2] == "| Linear Evaluation | resnet50 | - | 57.72 | - | - | - |"
