"""The sweep report's layouts (``layout:`` in a space): the paper's Tables 4, 1 and 2 from hand-made
trial outcomes, as exact Markdown (missing cells ``-``, seeds as mean ± std)."""

from __future__ import annotations

import pytest

from pacl_ray.sweeps import report
from pacl_ray.sweeps.report import TrialOutcome
from pacl_ray.sweeps.spaces import SpaceError, Trial, expand_trials, parse_space

TABLE4_ROWS = [
    {"name": "None: All", "labels": {"partition": "None", "sample usage": "All"},
     "set": {"train.objective": "clip"}},
    {"name": "Both: Strong-coupled", "labels": {"partition": "Both", "sample usage": "Strong-coupled"},
     "set": {"train.partitions": [1]}},
    {"name": "Both: all", "labels": {"partition": "Both",
                                     "sample usage": "Strong-coupled + Partial-coupled + Weak-coupled"}},
]


def _space(**extra):
    return parse_space({"mode": "rows", "rows": TABLE4_ROWS, **extra}, "t.yaml")


def test_table4_layout_labels_rows_like_the_paper():
    space = _space(layout="table4", baselines={"vanilla": {"train.objective": "clip"}})
    trials = {t.name: t for t in expand_trials(space, {})}
    outcomes = [
        TrialOutcome(trials["None: All"], {"UnbiasedEmo/Acc-6": 60.53, "UnbiasedEmo/F1-6": 60.01}),
        TrialOutcome(trials["Both: Strong-coupled"], {"UnbiasedEmo/Acc-6": 64.14}),  # F1 missing
        TrialOutcome(trials["Both: all"], error="boom"),
        TrialOutcome(trials["baseline:vanilla"], {"UnbiasedEmo/Acc-6": 61.0, "UnbiasedEmo/F1-6": 60.5}),
    ]
    initial = {"UnbiasedEmo/Acc-6": 57.7, "UnbiasedEmo/F1-6": 56.72}
    assert report.layout_markdown(space, {}, outcomes, initial) == (
        "| Partition | Sample Usage | UnbiasedEmo Acc-6 | UnbiasedEmo F1-6 |\n"
        "|---|---|---|---|\n"
        "| Initial weight |  | 57.70 | 56.72 |\n"
        "| None | All | 60.53 | 60.01 |\n"
        "| Both | Strong-coupled | 64.14 | - |\n"
        "| Both | Strong-coupled + Partial-coupled + Weak-coupled | failed: boom | - |\n"
        "| baseline:vanilla |  | 61.00 | 60.50 |\n"
    )


def test_table4_layout_on_a_seed_axis_gives_mean_and_std():
    space = _space(layout="table4", seeds=[0, 1])
    trials = expand_trials(space, {})
    values = {0: (60.0, 59.0), 1: (62.0, 59.0)}
    outcomes = [TrialOutcome(t, {"UnbiasedEmo/Acc-6": values[t.seed][0], "UnbiasedEmo/F1-6": values[t.seed][1]})
                for t in trials if t.repeat_of == "None: All"]
    assert report.layout_markdown(space, {}, outcomes) == (
        "| Partition | Sample Usage | UnbiasedEmo Acc-6 | UnbiasedEmo F1-6 |\n"
        "|---|---|---|---|\n"
        "| None | All | 61.00 ± 1.41 | 59.00 ± 0.00 |\n"
    )


def test_table1_layout_has_the_papers_columns_then_the_rest_per_protocol():
    space = parse_space({"mode": "rows", "layout": "table1",
                         "rows": [{"name": "PACL"}, {"name": "vanilla", "set": {"train.objective": "clip"}}]}, "t.yaml")
    pacl, vanilla = expand_trials(space, {})
    outcomes = [
        TrialOutcome(pacl, {"FI/Acc-8": 59.5, "FI/F1-8": 59.03, "IAPS/MSE": 1.982, "IAPS/R2": 0.31, "toy/Acc-2": 90.0,
                            "FI-finetune/Acc-8": 67.11, "FI-finetune/F1-8": 66.79}),
        TrialOutcome(vanilla, {"FI/Acc-8": 58.0}),
    ]
    initial = {"FI/Acc-8": 57.72, "FI/F1-8": 56.72, "IAPS/MSE": 2.13, "IAPS/R2": 0.279, "toy/Acc-2": 50.0}
    assert report.layout_markdown(space, {}, outcomes, initial) == (
        "| Protocol | Model | FI Acc-8 | FI F1-8 | Emotion-6 Acc-6 | Emotion-6 F1-6 | UnbiasedEmo Acc-6 | "
        "UnbiasedEmo F1-6 | WebEmo Acc-2 | WebEmo F1-2 | WebEmo Acc-7 | WebEmo F1-7 | WebEmo Acc-25 | WebEmo F1-25 | "
        "Emotic mAP | Emotic AUC | Emotic MSE | Emotic R2 | IAPS MSE | IAPS R2 | toy Acc-2 |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        "| Linear Evaluation | initial backbone | 57.72 | 56.72 | - | - | - | - | - | - | - | - | - | - | - | - | "
        "- | - | 2.130 | 0.2790 | 50.00 |\n"
        "|  | PACL | 59.50 | 59.03 | - | - | - | - | - | - | - | - | - | - | - | - | - | - | 1.982 | 0.3100 | 90.00 |\n"
        "|  | vanilla | 58.00 | - | - | - | - | - | - | - | - | - | - | - | - | - | - | - | - | - | - |\n"
        "| Fine-tuning | initial backbone | - | - | - | - | - | - | - | - | - | - | - | - | - | - | - | - | - | - | - |\n"
        "|  | PACL | 67.11 | 66.79 | - | - | - | - | - | - | - | - | - | - | - | - | - | - | - | - | - |\n"
        "|  | vanilla | - | - | - | - | - | - | - | - | - | - | - | - | - | - | - | - | - | - | - |\n"
    )


def test_table2_layout_with_seeds():
    space = parse_space({"mode": "rows", "layout": "table2", "seeds": [0, 1], "rows": [{"name": "PACL"}]}, "t.yaml")
    first, second = expand_trials(space, {})
    outcomes = [
        TrialOutcome(first, {"FI-2/Acc-2": 95.0, "FI/Acc-8": 80.0, "WebEmo-7/Acc-7": 57.0, "WebEmo/Acc-2": 70.0}),
        TrialOutcome(second, {"FI-2/Acc-2": 96.0, "FI/Acc-8": 81.0, "WebEmo-7/Acc-7": 57.0, "WebEmo/Acc-2": 71.0}),
    ]
    # hierarchical WebEmo's Acc-2 is not Table 2's (levels trained alone): not shown
    assert report.layout_markdown(space, {}, outcomes, {"FI/Acc-8": 70.0}) == (
        "| Protocol | Model | FI Acc-2 | FI Acc-8 | WebEmo Acc-2 | WebEmo Acc-7 | WebEmo Acc-25 |\n"
        "|---|---|---|---|---|---|---|\n"
        "| Linear Evaluation | initial backbone | - | 70.00 | - | - | - |\n"
        "|  | PACL | 95.50 ± 0.71 | 80.50 ± 0.71 | - | 57.00 ± 0.00 | - |\n"
    )


def test_split_protocol_reads_the_flattened_keys():
    assert report.split_protocol("FI/Acc-8") == ("linear", "FI/Acc-8")
    assert report.split_protocol("FI-2/Acc-2") == ("linear", "FI-2/Acc-2")
    assert report.split_protocol("WebEmo-25-finetune/F1-25") == ("finetune", "WebEmo-25/F1-25")
    assert report.split_protocol("FI-zeroshot[a photo]/Acc-8") == ("zeroshot[a photo]", "FI/Acc-8")


def test_table5_stays_the_default_and_layouts_are_checked():
    space = parse_space({"search": {"partition.sigma": {"grid": [0.5, 0.7]}}}, "t.yaml")
    assert space.layout == "table5"
    outcomes = [TrialOutcome(Trial("adopted"), {"FI/Acc-8": 59.5}),
                TrialOutcome(Trial("partition.sigma=0.5", {"partition.sigma": 0.5}), {"FI/Acc-8": 58.58})]
    base = {"partition": {"sigma": 0.7}}
    assert report.layout_markdown(space, base, outcomes) == (
        "| hyperparameter | value | FI/Acc-8 |\n"
        "|---|---|---|\n"
        "| partition.sigma | 0.5 | 58.58 |\n"
        "|  | 0.7 (adopted) | 59.50 |\n"
    )
    with pytest.raises(SpaceError, match="layout: expected one of table5, table4, table1, table2"):
        parse_space({"layout": "table3"}, "t.yaml")
    with pytest.raises(SpaceError, match="table4 lays out the labels of rows; it needs mode: rows"):
        parse_space({"layout": "table4", "search": {"partition.sigma": {"grid": [0.5]}}}, "t.yaml")
