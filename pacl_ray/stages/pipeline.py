"""Chaining the stages. Each ``stage_*`` function returns the stage's output, running it only
when its content key has no complete output yet, and running any missing upstream stage first.

    ingest -> partition (scores, then thresholds) -+
           -> embed -> cluster --------------------+-> train -> evaluate
"""

from __future__ import annotations

from typing import Any

from pacl_ray.stages.cache import StageOutput
from pacl_ray.config import RunConfig


def stage_ingest(cfg: RunConfig) -> StageOutput:
    from pacl_ray.stages.ingest import run_ingest

    return run_ingest(cfg)


def stage_scores(cfg: RunConfig) -> StageOutput:
    """Model scores of every pair (the expensive half of partitioning; independent of sigma)."""
    from pacl_ray.stages.partition import run_scoring

    return run_scoring(cfg, stage_ingest(cfg))


def stage_partition(cfg: RunConfig) -> StageOutput:
    """Scores thresholded at the configured sigma (cheap; re-run per sigma)."""
    from pacl_ray.stages.partition import run_partition

    return run_partition(cfg, stage_scores(cfg))


def stage_embed(cfg: RunConfig) -> StageOutput:
    from pacl_ray.stages.embed import run_embed

    return run_embed(cfg, stage_ingest(cfg))


def stage_cluster(cfg: RunConfig) -> StageOutput:
    from pacl_ray.stages.pseudo_labels import run_cluster

    return run_cluster(cfg, stage_embed(cfg))


def stage_train(cfg: RunConfig, callbacks: list | None = None) -> Any:
    """Training on the four upstream outputs; ``callbacks`` go to Ray Train (a sweep passes
    Tune's report callback). Returns :class:`pacl_ray.stages.train.TrainResult`."""
    from pacl_ray.stages.train import run_train

    return run_train(
        cfg,
        ingest=stage_ingest(cfg),
        partition=stage_partition(cfg),
        embed=stage_embed(cfg),
        cluster=stage_cluster(cfg),
        callbacks=callbacks,
    )
