"""Downstream evaluation (paper 4.4, 4.5): linear evaluation, fine-tuning and zero-shot.

    pacl-ray evaluate --backbone runs/export/ --task single:fi=/data/FI --task vad:iaps=/data/IAPS
    pacl-ray evaluate --backbone s3://bucket/runs/.../export --task single:fi=/data/FI
    pacl-ray evaluate --backbone resnet50 --task hierarchical:webemo=/data/WebEmo --protocol finetune

This module runs the evaluation; its parts live beside it:

* :mod:`~pacl_ray.evaluation.tasks` -- the ``KIND:DATASET=ROOT[,option=value...]`` task grammar;
* :mod:`~pacl_ray.evaluation.resolve` -- what ``--backbone`` names (export directory, weights
  file or model name; local paths or URIs), and an export's initial weights;
* :mod:`~pacl_ray.evaluation.features` -- frozen features, extracted once and cached;
* :mod:`~pacl_ray.evaluation.probes` -- the ``linear`` probe and ``finetune``;
* :mod:`~pacl_ray.evaluation.zeroshot` -- ``zeroshot`` from a PACL export's heads;
* :mod:`~pacl_ray.evaluation.report` -- the Table 1 layout.

Protocols: ``evaluate.protocol`` (comma-separated for several: ``linear``, ``finetune``,
``zeroshot``). The PACL export format is owned by :mod:`pacl_ray.formats.export`.

Outputs: ``{output_dir}/evaluate/<content key>/`` holds ``config.yaml``, ``rows.json``,
``results.md`` and ``results.csv`` (Table 1 layout: rows = model and protocol, columns = task
metrics), ``table1.md`` / ``table2.md`` (the paper's Tables 1 and 2, its columns in its order, ``-``
where a task was not evaluated; Table 2 wants ``single:fi2``, ``single:fi`` and ``levels:webemo``),
``quarantine/<task>.json`` and ``_SUCCESS``. Each (backbone, task, protocol) result is
also cached under ``{output_dir}/evaluate/rows/`` so adding a task re-runs only that task.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from typing import Any, Sequence

from pacl_ray.config import RunConfig, save_config, to_dict
from pacl_ray.evaluation.datasets import DatasetError, TaskData
from pacl_ray.evaluation.features import extract_features_many
from pacl_ray.evaluation.probes import run_finetune, run_linear
from pacl_ray.evaluation.report import write_results
from pacl_ray.evaluation.resolve import BackboneRef, initial_ref, resolve_backbone
from pacl_ray.evaluation.tasks import TaskSpec, TaskSpecError, load_tasks, parse_protocols, parse_task
from pacl_ray.evaluation.zeroshot import run_zeroshot
from pacl_ray.formats import storage
from pacl_ray.formats.export import EXPORT_HEADS, ExportError
from pacl_ray.stages import cache

EVALUATE_VERSION = 1  # bump when a change alters the results a given input produces (row cache key)


def _row_cache_uri(cfg: RunConfig, ref: BackboneRef, data: TaskData, protocol: str) -> str:
    e = cfg.evaluate
    settings: dict[str, Any] = {"seed": cfg.seed, "batch_size": e.batch_size}
    if protocol == "linear":
        settings.update(lr=e.linear_lr, epochs=e.linear_epochs, weight_decay=e.weight_decay)
    elif protocol == "finetune":
        settings.update(lr=e.linear_lr, backbone_lr=e.finetune_lr, epochs=e.finetune_epochs,
                        weight_decay=e.weight_decay, precision=e.precision)
    else:
        settings.update(prompts=list(e.prompts))
    key = cache.content_key("evaluate-row", EVALUATE_VERSION, ref.identity(), ref.export_dir and cache.file_fingerprint(
        storage.join(ref.export_dir, EXPORT_HEADS)), protocol, data.kind, data.label_names,
        data.fingerprints, settings)
    return storage.join(cfg.output_dir, "evaluate", "rows", f"{key}.json")


def _evaluate_one(cfg: RunConfig, ref: BackboneRef, spec: TaskSpec, data: TaskData, protocol: str) -> list[dict]:
    """Rows for one (backbone, task, protocol), from the row cache when present."""
    uri = _row_cache_uri(cfg, ref, data, protocol)
    if storage.exists(uri):
        cached = json.loads(storage.read_text(uri))
    else:
        if protocol == "linear":
            cached = [run_linear(cfg, ref, data)]
        elif protocol == "finetune":
            cached = [run_finetune(cfg, ref, data)]
        else:
            cached = run_zeroshot(cfg, ref, data)
        storage.write_text(uri, json.dumps(cached, indent=1))
    sizes = {f"n_{k}": len(v) for k, v in data.splits.items()}
    rows = []
    for result in cached:
        rows.append({
            "model": ref.label, "protocol": protocol, "prompt": result.get("prompt", ""),
            "task": spec.text, "dataset": spec.display, "kind": data.kind,
            "backbone": ref.name, "checkpoint": ref.checkpoint, **result["metrics"],
            "best_epoch": result.get("best_epoch"), "val_score": result.get("val_score"),
            **sizes, "quarantined": len(data.quarantine),
        })
    return rows


def evaluate_backbone(
    cfg: RunConfig, backbone: str, checkpoint: str, tasks: list[str], out_dir: str, label: str = "",
    protocol: str | None = None,
) -> list[dict]:
    """Evaluate one backbone on every task under one or more protocols; returns this call's rows
    (one per task and protocol; per prompt for zero-shot) and merges them into ``out_dir``'s
    results table (``results.md``, ``results.csv``, ``rows.json``), saving the resolved config.

    ``backbone``: timm name, ``open_clip:<arch>``, a PACL export directory or a weights file;
    ``checkpoint``: optional weights file (or export directory) for that architecture. Paths may be
    local, ``file://`` or object-storage URIs, and so may ``out_dir`` (see
    :mod:`pacl_ray.evaluation.resolve`)."""
    ref = resolve_backbone(cfg, backbone, checkpoint, label)
    protocols = parse_protocols(protocol or cfg.evaluate.protocol)
    specs = [parse_task(t, cfg.evaluate.split_seed) for t in tasks]
    if not specs:
        raise TaskSpecError("no tasks given; set evaluate.tasks or pass --task KIND:DATASET=ROOT")
    if "zeroshot" in protocols and not ref.export_dir:
        raise ExportError(f"protocol zeroshot needs a PACL export directory; {backbone!r} is not one")
    storage.makedirs(out_dir)
    save_config(cfg, out_dir)
    loaded = []
    for spec, data in load_tasks(specs):  # levels:webemo -> one task per level
        info = data.summary()
        sizes = " / ".join(f"{split} {n}" for split, n in info["sizes"].items())
        print(f"[evaluate] {info['name']} ({info['kind']}, {info['out_dims']} outputs): {sizes}"
              f"{', quarantined ' + str(info['quarantined']) if info['quarantined'] else ''}", flush=True)
        qname = re.sub(r"[^\w.-]+", "_", f"{spec.kind}-{spec.dataset}-{cache.content_key(spec.text)}")
        storage.write_text(storage.join(out_dir, "quarantine", f"{qname}.json"), json.dumps(data.quarantine, indent=1))
        runnable = [p for p in protocols if not (p == "zeroshot" and data.kind == "vad")]
        if len(runnable) < len(protocols):
            print(f"[evaluate] {spec.text}: zero-shot is not defined for VAD; skipped", flush=True)
        loaded.append((spec, data, runnable))
    _prefetch_features(cfg, ref, loaded)
    rows = []
    for spec, data, runnable in loaded:
        for name in runnable:
            rows.extend(_evaluate_one(cfg, ref, spec, data, name))
    write_results(out_dir, rows)
    return rows


def _prefetch_features(cfg: RunConfig, ref: BackboneRef, loaded: Sequence[tuple[TaskSpec, TaskData, list[str]]]) -> None:
    """Extract the frozen features every uncached (task, protocol) result needs in one Ray Data pass."""
    requests = []
    for _, data, protocols in loaded:
        splits: list[str] = []
        for protocol in protocols:
            if protocol == "finetune" or storage.exists(_row_cache_uri(cfg, ref, data, protocol)):
                continue
            splits.extend(s for s in (("train", "val", "test") if protocol == "linear" else ("test",)) if s not in splits)
        if splits:
            requests.append((data, splits))
    if requests:
        extract_features_many(cfg, ref, requests)


def main(cfg: RunConfig, backbone: str | None = None) -> int:
    """``pacl-ray evaluate``: evaluate ``backbone`` (and, for a PACL export, its initial weights) on
    ``evaluate.tasks``; prints the table and writes it under ``{output_dir}/evaluate/<key>/``."""
    from pacl_ray.stages.runtime import init_ray

    try:
        tasks = list(cfg.evaluate.tasks)
        if not tasks:
            raise TaskSpecError("no tasks given; pass --task KIND:DATASET=ROOT (see pacl_ray.evaluation.tasks)")
        for task in tasks:
            parse_task(task, cfg.evaluate.split_seed)
        protocols = parse_protocols(cfg.evaluate.protocol)
        ref = resolve_backbone(cfg, backbone)
        runs = [(ref, protocols)]
        if ref.export_dir and cfg.evaluate.compare_initial:
            initial_protocols = [p for p in protocols if p != "zeroshot"]
            if initial_protocols:
                runs.insert(0, (initial_ref(cfg, ref), initial_protocols))
        key = cache.content_key("evaluate", EVALUATE_VERSION, [(r.identity(), r.export_dir, p) for r, p in runs], tasks,
                                to_dict(cfg.evaluate), cfg.seed)
        out_dir = storage.join(cfg.output_dir, "evaluate", key)
        if cache.is_complete(out_dir):
            print(storage.read_text(storage.join(out_dir, "results.md")))
            print(f"evaluate: {out_dir} (cached)")
            return 0
        init_ray(cfg.ray)
        rows = []
        for run_ref, run_protocols in runs:
            run_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone_pretrained=run_ref.pretrained))
            rows.extend(evaluate_backbone(
                run_cfg, run_ref.export_dir or run_ref.name, "" if run_ref.export_dir else run_ref.checkpoint,
                tasks, out_dir, label=run_ref.label, protocol=",".join(run_protocols),
            ))
        save_config(cfg, out_dir)
        cache.mark_complete(out_dir, {"rows": len(rows), "models": [r.label for r, _ in runs], "tasks": tasks})
    except (TaskSpecError, DatasetError, ExportError, FileNotFoundError) as err:
        print(f"pacl-ray evaluate: error: {err}", file=sys.stderr)
        return 2
    print(storage.read_text(storage.join(out_dir, "results.md")))
    print("The paper's Tables 1 and 2 (its columns, '-' where not evaluated): table1.md, table2.md")
    print(f"evaluate: {out_dir}")
    return 0
