"""Starting or joining Ray, and asking what the cluster offers."""

from __future__ import annotations

import os

from pacl_ray.config import RayConfig


def init_ray(cfg: RayConfig | None = None) -> None:
    """Join ``cfg.address`` (or ``RAY_ADDRESS``), or start a local instance; a no-op if connected."""
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    # Keep the driver's log quiet; progress bars and stage summaries are what users read.
    kwargs = dict(include_dashboard=False, log_to_driver=True, configure_logging=False)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, **kwargs)


def cluster_gpus() -> float:
    """GPUs in the Ray cluster (0 when Ray is not started)."""
    import ray

    if not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    import ray

    if not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("CPU", 0.0))
