"""The PACL model (paper 3.3): a visual backbone plus one bias-free linear projection head per
modality into a shared width, with L2-normalised outputs.

The text tower is frozen and its pooled features are cached by the embed stage, so the text side
of the model is only its projection head: it takes the stored text feature vectors.

    model, backbone = build_model(384, backbone="resnet50", embed_dim=768, seed=0)
    z_image, z_text = model(images, text_features)  # [B, embed_dim] each, unit norm
"""

from __future__ import annotations

import random
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from pacl_ray.core import backbones


class PACLModel(nn.Module):
    """Backbone + projection heads.

    Args:
        backbone: module mapping images [B, 3, H, W] to pooled features [B, image_dim].
        image_dim: width of the backbone's pooled features.
        text_dim: width of the cached text-encoder features.
        embed_dim: shared width of both projections (SPEC: 768).
    """

    def __init__(self, backbone: nn.Module, image_dim: int, text_dim: int, embed_dim: int):
        super().__init__()
        self.backbone = backbone
        # The export contract's names (pacl_ray.formats.export); checkpoints saved with the former
        # names image_head / text_head still load (_load_from_state_dict).
        self.image_proj = nn.Linear(image_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for old, new in (("image_head.", "image_proj."), ("text_head.", "text_proj.")):
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> unit-norm projections [B, embed_dim]."""
        return F.normalize(self.image_proj(self.backbone(images)), dim=-1)

    def encode_text(self, text_features: torch.Tensor) -> torch.Tensor:
        """cached text features [B, text_dim] -> unit-norm projections [B, embed_dim]."""
        return F.normalize(self.text_proj(text_features), dim=-1)

    def forward(self, images: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(text_features)


def head_parameters(model: PACLModel) -> list[nn.Parameter]:
    return [*model.image_proj.parameters(), *model.text_proj.parameters()]


class OnePassRandomResizedCrop:
    """timm's ``RandomResizedCropAndInterpolation`` ``crop`` (its parameters and its random draws
    from Python's ``random``) with the crop and the resample done by one
    ``PIL.Image.resize(box=...)`` call instead of a crop copy followed by a resize (torchvision's
    ``resized_crop``).

    Inside the crop the output is identical to timm's. Within the filter's reach of the crop's
    edges (2 output px for bicubic when downscaling) it can differ: PIL's resample reads the real
    pixels just outside the box, where ``crop`` + ``resize`` repeats the crop's edge pixels. Saves
    the crop's copy (1-5% of decode + transform at 224 px, ``benchmarks/decode_bench.py``).
    PIL image -> PIL image of ``size`` (height, width).
    """

    def __init__(self, crop):
        from torchvision.transforms.functional import pil_modes_mapping

        self.crop = crop
        self.size, self.scale, self.ratio = tuple(crop.size), tuple(crop.scale), tuple(crop.ratio)
        modes = crop.interpolation  # one mode, or a tuple for timm's 'random'
        self.resample = (tuple(pil_modes_mapping[m] for m in modes) if isinstance(modes, (tuple, list))
                         else pil_modes_mapping[modes])

    def __call__(self, img):
        top, left, height, width = self.crop.get_params(img, self.scale, self.ratio)
        resample = random.choice(self.resample) if isinstance(self.resample, tuple) else self.resample
        return img.resize((self.size[1], self.size[0]), resample, box=(left, top, left + width, top + height))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.crop!r})"


def train_transform(
    image_size: int,
    interpolation: str = "bicubic",
    crop_scale: tuple[float, float] = (0.5, 1.0),
    hflip: float = 0.5,
    color_jitter: float = 0.0,
    normalize: Optional[tuple[Sequence[float], Sequence[float]]] = None,
):
    """The training augmentation of every backbone (SPEC "Training recipe" Choice): a random-resized
    crop of ``crop_scale`` of the image area (aspect 3/4-4/3) to ``image_size`` px
    (:class:`OnePassRandomResizedCrop`), a horizontal flip with probability ``hflip``. Colour is
    an emotional cue, so there is no colour jitter (unless ``color_jitter`` > 0) and no grayscale.

    Built with timm's ``create_transform`` for timm backbones and open_clip towers alike, so both
    see the same augmentation. PIL RGB image -> uint8 tensor [3, image_size, image_size] (timm's
    ``use_prefetcher`` form): the float conversion and the backbone's normalisation run on the
    training device (:class:`pacl_ray.stages.train_step.ImageNormalizer` with
    :func:`train_normalization`), so the CPU decode workers do less and ship a quarter of the bytes.
    ``normalize=(mean, std)`` instead ends in timm's ``ToTensor`` + ``Normalize``: float32
    ``(x / 255 - mean) / std``, the same model input as the device path up to float rounding.
    Raises ValueError for a crop range outside 0 < low <= high <= 1.
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

    scale = tuple(float(v) for v in crop_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"train.crop_scale must be [low, high] with 0 < low <= high <= 1, got {list(crop_scale)}")
    mean, std = normalize if normalize is not None else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    transform = create_transform(
        input_size=(3, image_size, image_size), is_training=True, scale=scale, hflip=hflip,
        # None leaves timm's ColorJitter out altogether (0 would add a no-op one).
        color_jitter=float(color_jitter) if color_jitter > 0 else None, grayscale_prob=0.0,
        interpolation=interpolation, mean=tuple(mean), std=tuple(std), use_prefetcher=normalize is None,
    )
    transform.transforms[0] = OnePassRandomResizedCrop(transform.transforms[0])
    return transform


def train_normalization(backbone: backbones.Backbone) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel, in [0, 1] units, that the backbone's inputs are normalised with
    after :func:`train_transform`: a timm backbone's resolved data config
    (:func:`pacl_ray.core.backbones.data_config`), an open_clip tower's preprocess config."""
    if backbone.data_config:
        return tuple(map(float, backbone.data_config["mean"])), tuple(map(float, backbone.data_config["std"]))
    return _open_clip_normalization(backbone.model.visual)


def _open_clip_normalization(visual) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pre = dict(getattr(visual, "preprocess_cfg", None) or {})
    mean = pre.get("mean") or getattr(visual, "image_mean", None)
    std = pre.get("std") or getattr(visual, "image_std", None)
    if mean is None or std is None:
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        mean, std = mean or OPENAI_DATASET_MEAN, std or OPENAI_DATASET_STD
    return tuple(map(float, mean)), tuple(map(float, std))


def _timm_transforms(
    backbone: backbones.Backbone, image_size: int, crop_pct: float | None, interpolation: str, **augmentation,
) -> backbones.Backbone:
    """Set a timm backbone's train transform (:func:`train_transform`), optionally at
    ``image_size`` px: then its eval transform too, and unless ``crop_pct`` is given with no eval
    crop (crop_pct 1.0): an explicit training size means the whole image. Settings resolve through
    :func:`pacl_ray.core.backbones.data_config`, as the embed and evaluate transforms do."""
    from timm.data import create_transform

    if image_size and image_size != backbone.image_size and hasattr(backbone.model, "set_input_size"):
        backbone.model.set_input_size(img_size=image_size)  # ViT-style absolute position grids
    if image_size:
        data_cfg = backbones.data_config(backbone.model, image_size, 1.0 if crop_pct is None else crop_pct,
                                         interpolation)
        backbone.eval_transform = create_transform(**data_cfg, is_training=False)
        backbone.image_size, backbone.data_config = image_size, data_cfg
    else:
        data_cfg = backbone.data_config
    backbone.train_transform = train_transform(
        int(data_cfg["input_size"][-1]), data_cfg.get("interpolation") or "bicubic", **augmentation,
    )
    return backbone


def _open_clip_transforms(backbone: backbones.Backbone, **augmentation) -> backbones.Backbone:
    """Replace an open_clip tower's own train transform (crops of 90-100%, no flip) by
    :func:`train_transform` at its size and interpolation (its normalisation:
    :func:`train_normalization`)."""
    pre = dict(getattr(backbone.model.visual, "preprocess_cfg", None) or {})
    backbone.train_transform = train_transform(backbone.image_size, pre.get("interpolation") or "bicubic", **augmentation)
    return backbone


def build_backbone(
    backbone: str = "resnet50",
    pretrained: str = "true",
    checkpoint: str = "",
    input_size: int = 0,
    image_size: int = 0,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    hflip: float = 0.5,
    color_jitter: float = 0.0,
    crop_pct: float | None = None,
    interpolation: str = "",
    model_kwargs: dict | None = None,
) -> backbones.Backbone:
    """A backbone (see :func:`~pacl_ray.core.backbones.create_backbone`: ``model_kwargs`` go to
    ``timm.create_model``, a checkpoint's classifier is dropped) at ``input_size`` / ``crop_pct`` /
    ``interpolation`` (as the embed stage saw it), or at ``image_size`` px when that is set (timm
    only), with the training augmentation of :func:`train_transform` (the same for timm and
    open_clip). Raises ValueError for an ``image_size`` override of an open_clip tower or a bad
    ``crop_scale``."""
    augmentation = dict(crop_scale=crop_scale, hflip=hflip, color_jitter=color_jitter)
    model = backbones.create_backbone(backbone, pretrained, checkpoint, input_size, crop_pct=crop_pct,
                                      interpolation=interpolation, model_kwargs=model_kwargs)
    if backbones.is_open_clip_backbone(backbone):
        if image_size and image_size != model.image_size:
            raise ValueError(
                f"train.image_size={image_size}: open_clip towers train at their own size "
                f"({model.image_size}); leave train.image_size at 0"
            )
        return _open_clip_transforms(model, **augmentation)
    return _timm_transforms(model, image_size, crop_pct, interpolation, **augmentation)


def build_model(
    text_dim: int,
    *,
    embed_dim: int = 768,
    seed: int = 0,
    **backbone_args,
) -> tuple[PACLModel, backbones.Backbone]:
    """The PACL model and the :class:`~pacl_ray.core.backbones.Backbone` it wraps.

    Args:
        text_dim: width of the cached text features.
        embed_dim: shared projection width (SPEC: 768).
        seed: heads (and any random backbone init) come from ``torch.manual_seed(seed)``, so every
            worker builds the same model (DDP also broadcasts rank 0's parameters).
        backbone_args: :func:`build_backbone`'s arguments (backbone, pretrained, checkpoint,
            input_size, image_size, crop_scale, hflip, color_jitter, crop_pct, interpolation,
            model_kwargs).

    A RunConfig's arguments are :func:`pacl_ray.config.model_args`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_backbone(**backbone_args)
        model = PACLModel(backbone.model, backbone.num_features, text_dim, embed_dim)
    return model, backbone
