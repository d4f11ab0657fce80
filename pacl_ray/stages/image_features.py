"""The frozen image-feature extractor: one callable-class UDF for every stage that needs pooled
backbone features (the embed stage's initial backbone, evaluation's frozen backbones).

As a Ray Data UDF (``ds.map_batches(ImageFeatureExtractor, fn_constructor_kwargs=...)``) the
backbone loads once per actor; called in a loop in one process it does the same work without actor
start-up. The backbone's eval transform and feature width are kept for callers in that process.

    extractor = ImageFeatureExtractor("resnet50", "true", checkpoint="s3://b/export/backbone.safetensors")
    extractor({"pixels": pixels})          # float32 [B, 3, H, W], already transformed
    extractor({"path": paths, "row": ids}) # image files or URIs, decoded and transformed here
    # -> the batch without pixels/path, plus feature_column float32 [B, D]
"""

from __future__ import annotations


import numpy as np

from pacl_ray.core import backbones
from pacl_ray.formats.images import load_rgb, min_side_for
from pacl_ray.formats.export import local_file


class ImageFeatureExtractor:
    """Callable-class UDF: a frozen backbone's pooled features float32 [B, D].

    Args:
        backbone: timm name or ``open_clip:<arch>``.
        pretrained: pretrained tag (``"true"``/``"false"`` for timm); ignored when ``checkpoint`` is set.
        checkpoint: weights file as a local path or URI (remote files are copied to a local cache
            once per node, :func:`pacl_ray.formats.export.local_file`); "" for ``pretrained``.
        input_size: transform resolution; 0 = the architecture's own.
        crop_pct, interpolation: eval transform overrides (None / "" = the model's pretrained_cfg;
            :func:`pacl_ray.core.backbones.data_config`).
        model_kwargs: ``timm.create_model`` keywords (``model.backbone_kwargs``).
        precision: autocast precision on accelerators (``bf16``, ``fp16``, ``fp32``).
        feature_column: the output column's name.

    A batch holds ``pixels`` float32 [B, 3, H, W] (already through :attr:`eval_transform`) or
    ``path`` [B] (image files or URIs, decoded and transformed in the actor). The output is the
    batch without those columns, plus ``feature_column``.
    """

    def __init__(self, backbone: str, pretrained: str, checkpoint: str = "", input_size: int = 0,
                 precision: str = "fp32", feature_column: str = "image_feature", crop_pct: float | None = None,
                 interpolation: str = "", model_kwargs: dict | None = None):
        self.device = backbones.default_device()
        built = backbones.create_backbone(backbone, pretrained, local_file(checkpoint), input_size,
                                          crop_pct=crop_pct, interpolation=interpolation, model_kwargs=model_kwargs)
        self.model = built.model.to(self.device).eval().requires_grad_(False)
        self.eval_transform, self.num_features = built.eval_transform, built.num_features
        self.precision = precision
        self.feature_column = feature_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        if "pixels" in batch:
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"], dtype=np.float32))
        elif "path" in batch:
            side = min_side_for(self.eval_transform)  # large JPEGs decode at reduced scale, never below the resize
            pixels = torch.stack([self.eval_transform(load_rgb(str(p), min_side=side)) for p in batch["path"]])
        else:
            raise KeyError(f"ImageFeatureExtractor: a batch needs 'pixels' or 'path', got {sorted(batch)}")
        with torch.inference_mode(), backbones.autocast(self.device, self.precision):
            features = self.model(pixels.to(self.device)).float().cpu().numpy()
        out = {k: v for k, v in batch.items() if k not in ("pixels", "path")}
        out[self.feature_column] = features
        return out
