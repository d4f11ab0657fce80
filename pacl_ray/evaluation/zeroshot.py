"""Zero-shot classification with a PACL export (paper 4.5, Table 3).

Class prompts -> frozen text encoder -> text head (``text_proj``); image -> backbone -> image head
(``image_proj``); cosine argmax (cosine scores rank the categories for multi-label). One row per
prompt template (``evaluate.prompts``; ``{}`` or the paper's ``[C]`` marks the class name) plus an
``ensemble`` row (the mean of the templates' normalised text embeddings). Not defined for VAD.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import nn

from pacl_ray.config import RunConfig
from pacl_ray.core import metrics
from pacl_ray.evaluation.datasets import TaskData
from pacl_ray.evaluation.features import extract_features
from pacl_ray.evaluation.resolve import BackboneRef
from pacl_ray.evaluation.tasks import TaskSpecError
from pacl_ray.formats.export import EXPORT_HEADS, ExportError, load_export


def prompt_class_name(name: str) -> str:
    """How a label reads inside a prompt: ``Doubt/Confusion`` -> ``doubt or confusion``."""
    return name.replace("/", " or ").replace("_", " ").replace("-", " ").strip().lower()


def class_prompts(template: str, names: Sequence[str]) -> list[str]:
    """Fill a template (``{}`` or the paper's ``[C]``) with each class name."""
    template = template.replace("[C]", "{}")
    if template.count("{}") != 1:
        raise TaskSpecError(f"prompt template {template!r} must contain exactly one {{}} (or [C])")
    return [template.replace("{}", prompt_class_name(n)) for n in names]


def zero_shot_scores(image_features: torch.Tensor, text_embeddings: torch.Tensor, image_proj: torch.Tensor) -> torch.Tensor:
    """Cosines [N, C] between projected images and L2-normalised class text embeddings [C, E];
    ``image_features`` [N, Dv] are raw pooled backbone features, ``image_proj`` [E, Dv]."""
    images = nn.functional.normalize(image_features.float() @ image_proj.T, dim=-1)
    return images @ text_embeddings.T


@functools.lru_cache(maxsize=2)
def _text_encoder(name: str, pooling: str, max_length: int):
    """The frozen text encoder, loaded once per process however many tasks are evaluated."""
    from pacl_ray.core.backbones import TextEncoder

    return TextEncoder(name, pooling, max_length)


def run_zeroshot(cfg: RunConfig, ref: BackboneRef, data: TaskData) -> list[dict]:
    """Zero-shot test metrics per prompt template (plus the template ensemble)."""
    if data.kind == "vad":
        raise TaskSpecError(f"zero-shot is not defined for the VAD regression task {data.name!r}")
    if not ref.export_dir:
        raise ExportError(f"zero-shot needs a PACL export directory (with {EXPORT_HEADS}); {ref.label!r} is not one")
    export = load_export(ref.export_dir)
    encoder = _text_encoder(export.meta["text_encoder"], export.meta["text_pooling"], int(export.meta["text_max_length"]))
    if encoder.dim != export.text_proj.shape[1]:
        raise ExportError(f"{ref.export_dir}: text_proj.weight expects {export.text_proj.shape[1]}-d text "
                          f"features but {export.meta['text_encoder']} gives {encoder.dim}")
    features = torch.as_tensor(extract_features(cfg, ref, data, ("test",))["test"])
    if features.shape[1] != export.image_proj.shape[1]:
        raise ExportError(f"{ref.export_dir}: image_proj.weight expects {export.image_proj.shape[1]}-d image "
                          f"features but the backbone gives {features.shape[1]}")
    templates = list(cfg.evaluate.prompts)
    if not templates:
        raise TaskSpecError("evaluate.prompts is empty; zero-shot needs at least one template")
    # per level (hierarchical) or one group: [template][group] -> normalised text embeddings [C, E]
    embedded = []
    for template in templates:
        groups = []
        for names in data.label_names:
            text = encoder.encode(class_prompts(template, names)).cpu() @ export.text_proj.T
            groups.append(nn.functional.normalize(text, dim=-1))
        embedded.append(groups)
    variants = [(t, g) for t, g in zip(templates, embedded)]
    if len(templates) > 1:
        ensemble = [nn.functional.normalize(torch.stack([e[i] for e in embedded]).mean(0), dim=-1)
                    for i in range(len(data.label_names))]
        variants.append(("ensemble", ensemble))
    results = []
    for prompt, groups in variants:
        scores = [zero_shot_scores(features, g, export.image_proj) for g in groups]
        if data.kind == "single":
            outputs = scores[0].argmax(1).numpy()
        elif data.kind == "hierarchical":
            outputs = torch.stack([s.argmax(1) for s in scores], 1).numpy()
        else:  # multilabel: cosines rank the categories
            outputs = scores[0].numpy()
        results.append({"prompt": prompt, "metrics": metrics.task_metrics(
            data.kind, data.splits["test"].targets, outputs, data.out_dims)})
    return results
