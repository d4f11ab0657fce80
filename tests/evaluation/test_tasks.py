"""Task specs and protocols: the grammar and its error messages."""

from __future__ import annotations

import pytest

from pacl_ray.evaluation import tasks
from pacl_ray.evaluation.tasks import TaskSpecError


def test_parse_task_forms():
    spec = tasks.parse_task("single:fi=/data/FI", default_seed=7)
    assert (spec.kind, spec.dataset, spec.root, spec.seed, spec.limit) == ("single", "fi", "/data/FI", 7, 0)
    assert spec.display == "FI" and spec.task_kind == "single"
    spec = tasks.parse_task("imagefolder:emo=/path/with,comma/root,limit=20,seed=3,name=My Emo")
    assert (spec.root, spec.limit, spec.seed, spec.display) == ("/path/with,comma/root", 20, 3, "My Emo")
    assert spec.task_kind == "single"
    assert tasks.parse_task("vad:iaps=s3://bucket/IAPS").root == "s3://bucket/IAPS"
    assert tasks.parse_task("hierarchical:webemo=/w").display == "WebEmo"


@pytest.mark.parametrize(
    "text, message",
    [
        ("single:fi", "expected KIND:DATASET=ROOT"),
        ("fi=/data", "expected KIND:DATASET=ROOT"),
        ("single:fi=", "expected KIND:DATASET=ROOT"),
        ("regression:fi=/x", "unknown kind 'regression'"),
        ("single:webemo=/x", "no single reader for 'webemo'.*imagefolder:webemo"),
        ("multilabel:fi=/x", "multilabel datasets: emotic"),
        ("single:fi=/x,limit=many", "integers"),
        ("single:fi=/x,colour=red", "unknown option 'colour'"),
        ("imagefolder:=/x", "empty dataset name"),
    ],
)
def test_parse_task_errors(text, message):
    with pytest.raises(TaskSpecError, match=message):
        tasks.parse_task(text)


def test_parse_protocols():
    assert tasks.parse_protocols("linear") == ["linear"]
    assert tasks.parse_protocols("linear, zeroshot") == ["linear", "zeroshot"]
    with pytest.raises(TaskSpecError, match="expected one or more"):
        tasks.parse_protocols("probe")
