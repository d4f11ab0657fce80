"""Which backbone to evaluate: ``--backbone`` (or a sweep trial's exported weights) -> BackboneRef.

``--backbone`` (or :func:`pacl_ray.evaluation.evaluate.evaluate_backbone`'s ``backbone`` /
``checkpoint``) is one of

* a PACL export directory (holds ``export.json``; :mod:`pacl_ray.formats.export`): its
  ``backbone.safetensors`` is evaluated, and zero-shot is possible; with
  ``evaluate.compare_initial`` the export's initial weights (:func:`initial_ref`) are evaluated
  too, so the table has the "X" and "X + PACL" rows of Table 1;
* a checkpoint file (safetensors or torch) for the architecture ``model.backbone``;
* a timm name or ``open_clip:<arch>`` (weights from ``model.backbone_pretrained``).

Directories and files may be local paths, ``file://`` or object-storage URIs (``s3://``,
``gs://``): everything here goes through :mod:`pacl_ray.formats.storage`, and the weights are
copied to a local file only where a model loads them (:func:`pacl_ray.formats.export.local_file`).
"""

from __future__ import annotations

import dataclasses
import posixpath
from dataclasses import dataclass, field
from typing import Optional

import pyarrow.fs as pafs

from pacl_ray.config import RunConfig
from pacl_ray.formats import export, storage
from pacl_ray.formats.export import EXPORT_BACKBONE, EXPORT_META, ExportError
from pacl_ray.stages import cache


@dataclass(frozen=True)
class BackboneRef:
    """What to evaluate: a backbone architecture, its weights, and its row label."""

    name: str  # timm name or open_clip:<arch>
    pretrained: str
    checkpoint: str = ""  # weights file (local path or URI); wins over pretrained
    label: str = ""
    export_dir: str = ""  # a PACL export directory (heads + text encoder for zero-shot)
    input_size: int = 0  # transform resolution; 0 = the architecture's own
    crop_pct: Optional[float] = None  # eval crop fraction; None = the architecture's own
    interpolation: str = ""  # "" = the architecture's own
    model_kwargs: dict = field(default_factory=dict, hash=False)  # timm.create_model keywords

    def identity(self) -> list:
        """What the features depend on (the label does not)."""
        weights = cache.file_fingerprint(self.checkpoint) if self.checkpoint else self.pretrained
        settings = {k: v for k, v in self.backbone_args().items() if v not in (None, "", {})}
        return [self.name, weights, self.input_size] + ([settings] if settings else [])

    def backbone_args(self) -> dict:
        """The transform and architecture keywords of ``create_backbone`` / ``ImageFeatureExtractor``."""
        return {"crop_pct": self.crop_pct, "interpolation": self.interpolation,
                "model_kwargs": dict(self.model_kwargs)}


def _model_settings(cfg: RunConfig) -> dict:
    """BackboneRef's transform/architecture fields from ``model.*``."""
    return {"crop_pct": cfg.model.crop_pct, "interpolation": cfg.model.interpolation,
            "model_kwargs": dict(cfg.model.backbone_kwargs)}


def _file_type(uri: str) -> pafs.FileType:
    fs, path = storage.resolve(uri)
    return fs.get_file_info(path).type


def _parent(uri: str) -> tuple[str, str]:
    """(directory, file name) of a normalised local path or URI (both use ``/``)."""
    return posixpath.dirname(uri), posixpath.basename(uri)


def _export_ref(directory: str, label: str) -> BackboneRef:
    directory = storage.normalize(directory)
    meta = export.read_export_meta(directory)
    return BackboneRef(name=meta["backbone"], pretrained="true", checkpoint=export.backbone_uri(directory),
                       label=label or f"{meta['backbone']} + PACL", export_dir=directory,
                       input_size=int(meta.get("image_size") or 0), crop_pct=meta.get("crop_pct"),
                       interpolation=meta.get("interpolation") or "", model_kwargs=dict(meta.get("backbone_kwargs") or {}))


def resolve_backbone(cfg: RunConfig, backbone: str | None = None, checkpoint: str = "", label: str = "") -> BackboneRef:
    """Turn a ``--backbone`` value (export dir, checkpoint file, or model name) and an optional
    ``checkpoint`` (weights file or export dir) into a BackboneRef; with neither, the configured
    ``model.backbone`` / ``model.backbone_checkpoint``.

    Raises:
        ExportError: a directory without ``export.json``, or an incomplete export.
        FileNotFoundError: ``checkpoint`` does not exist."""
    if not backbone:
        backbone, checkpoint = cfg.model.backbone, checkpoint or cfg.model.backbone_checkpoint
    if export.is_export_dir(backbone):
        return _export_ref(backbone, label)
    if checkpoint and export.is_export_dir(checkpoint):
        return _export_ref(checkpoint, label)
    kind = _file_type(backbone)
    if kind == pafs.FileType.File:  # a bare weights file for the configured architecture
        name, weights = cfg.model.backbone, storage.normalize(backbone)
        return BackboneRef(name=name, pretrained="true", checkpoint=weights,
                           label=label or f"{name} ({_parent(weights)[1]})",
                           input_size=cfg.model.backbone_input_size, **_model_settings(cfg))
    if kind == pafs.FileType.Directory:
        raise ExportError(f"{storage.normalize(backbone)}: a directory without {EXPORT_META} is neither a "
                          f"PACL export nor a checkpoint")
    if checkpoint:
        checkpoint = storage.normalize(checkpoint)
        if not storage.exists(checkpoint):
            raise FileNotFoundError(f"checkpoint {checkpoint} not found")
        parent, filename = _parent(checkpoint)
        if filename == EXPORT_BACKBONE and export.is_export_dir(parent):
            return dataclasses.replace(_export_ref(parent, label), name=backbone)
        return BackboneRef(name=backbone, pretrained="true", checkpoint=checkpoint,
                           label=label or f"{backbone} ({filename})",
                           input_size=cfg.model.backbone_input_size, **_model_settings(cfg))
    return BackboneRef(name=backbone, pretrained=cfg.model.backbone_pretrained, label=label or backbone,
                       input_size=cfg.model.backbone_input_size, **_model_settings(cfg))


def initial_ref(cfg: RunConfig, exported: BackboneRef) -> BackboneRef:
    """The initial weights a PACL export started from (``backbone_pretrained`` /
    ``backbone_checkpoint`` in export.json, else ``model.backbone_pretrained``).

    Raises ExportError when the recorded initial checkpoint no longer exists."""
    meta = export.read_export_meta(exported.export_dir)
    pretrained = str(meta.get("backbone_pretrained", cfg.model.backbone_pretrained))
    checkpoint = meta.get("backbone_checkpoint") or ""
    if checkpoint:
        checkpoint = storage.normalize(checkpoint)
        if not storage.exists(checkpoint):
            raise ExportError(f"{exported.export_dir}: the initial checkpoint {checkpoint} recorded in "
                              f"{EXPORT_META} is missing")
    return BackboneRef(name=exported.name, pretrained=pretrained, checkpoint=checkpoint,
                       label=exported.name, input_size=exported.input_size, crop_pct=exported.crop_pct,
                       interpolation=exported.interpolation, model_kwargs=dict(exported.model_kwargs))
