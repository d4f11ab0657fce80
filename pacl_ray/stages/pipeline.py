"""Chaining the stages. A :class:`Pipeline` resolves each stage at most once per run -- running it
when its content key has no complete output yet, else taking the verified cached output -- and
hands the outputs forward, so training on top of everything lists, stats and prints ingest once.

    ingest -> scores -> partition -+
           -> embed  -> cluster ---+-> train -> evaluate

The module-level ``stage_*`` functions are one-shot pipelines, for the CLI's single stages.
"""

from __future__ import annotations

from typing import Any

from pacl_ray.config import RunConfig
from pacl_ray.stages.cache import StageOutput


class Pipeline:
    """The stages of one config, each resolved once (memoised on this object).

    ``upstream`` pre-seeds resolved outputs by stage name (a sweep's driver resolves the shared
    stages once and hands them to every trial)."""

    def __init__(self, cfg: RunConfig, upstream: dict[str, StageOutput] | None = None):
        self.cfg = cfg
        self.outputs: dict[str, StageOutput] = dict(upstream or {})

    def _stage(self, name: str, run) -> StageOutput:
        if name not in self.outputs:
            self.outputs[name] = run()
        return self.outputs[name]

    def ingest(self) -> StageOutput:
        from pacl_ray.stages.ingest import run_ingest

        return self._stage("ingest", lambda: run_ingest(self.cfg))

    def scores(self) -> StageOutput:
        """Model scores of every pair (the expensive half of partitioning; independent of sigma)."""
        from pacl_ray.stages.scoring import run_scoring

        return self._stage("scores", lambda: run_scoring(self.cfg, self.ingest()))

    def partition(self) -> StageOutput:
        """Scores thresholded at the configured sigma (cheap; re-run per sigma)."""
        from pacl_ray.stages.partition import run_partition

        return self._stage("partition", lambda: run_partition(self.cfg, self.scores()))

    def embed(self) -> StageOutput:
        from pacl_ray.stages.embed import run_embed

        return self._stage("embed", lambda: run_embed(self.cfg, self.ingest()))

    def cluster(self) -> StageOutput:
        from pacl_ray.stages.pseudo_labels import run_cluster

        return self._stage("cluster", lambda: run_cluster(self.cfg, self.embed()))

    def upstream_of_train(self) -> dict[str, StageOutput]:
        """The four outputs training reads, by stage name. The backbone and its checkpoint are
        checked first (:func:`pacl_ray.stages.embed.check_backbone`), before any stage runs."""
        from pacl_ray.stages.embed import check_backbone

        if "embed" not in self.outputs:
            check_backbone(self.cfg)
        return {"ingest": self.ingest(), "partition": self.partition(), "embed": self.embed(),
                "cluster": self.cluster()}

    def train(self, callbacks: list | None = None, validation: Any = None, started_at: float | None = None,
              in_process: bool = False) -> Any:
        """Training on the four upstream outputs; ``callbacks`` go to Ray Train (a sweep passes
        Tune's report callback); ``validation``: the held-out probe set
        (:class:`pacl_ray.stages.validation.ValidationSet`, or None); ``started_at`` and
        ``in_process``: see :func:`pacl_ray.stages.train.run_train`. Returns
        :class:`pacl_ray.stages.train.TrainResult`."""
        from pacl_ray.stages.train import run_train

        return run_train(self.cfg, **self.upstream_of_train(), callbacks=callbacks, validation=validation,
                         started_at=started_at, in_process=in_process)


def stage_ingest(cfg: RunConfig) -> StageOutput:
    return Pipeline(cfg).ingest()


def stage_scores(cfg: RunConfig) -> StageOutput:
    return Pipeline(cfg).scores()


def stage_partition(cfg: RunConfig) -> StageOutput:
    return Pipeline(cfg).partition()


def stage_embed(cfg: RunConfig) -> StageOutput:
    return Pipeline(cfg).embed()


def stage_cluster(cfg: RunConfig) -> StageOutput:
    return Pipeline(cfg).cluster()


def stage_train(cfg: RunConfig, callbacks: list | None = None,
                upstream: dict[str, StageOutput] | None = None, validation: Any = None,
                started_at: float | None = None, in_process: bool = False) -> Any:
    """Train on top of every upstream stage, each resolved once (``upstream``: outputs already
    resolved by the caller, by stage name; the other arguments: see :meth:`Pipeline.train`).
    Returns :class:`pacl_ray.stages.train.TrainResult`."""
    return Pipeline(cfg, upstream).train(callbacks=callbacks, validation=validation, started_at=started_at,
                                         in_process=in_process)
