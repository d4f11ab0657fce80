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
        ray.init(num_cpus=local_num_cpus(cfg), num_gpus=cfg.num_gpus,
                 runtime_env={"worker_process_setup_hook": "pacl_ray.stages.runtime.quiet_worker_logs"}, **kwargs)


# Ray Train V2's PlacementGroupCleaner asks the State API (served by the dashboard) every second
# whether the controller lives; a local instance here runs without the dashboard, so it would
# print a warning every second of every training run.
QUIETED_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker_logs() -> None:
    """Ray worker-process setup hook of local instances: silence the loggers in QUIETED_LOGGERS."""
    import logging

    for name in QUIETED_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


# A pipeline holds several Ray Data actor pools, their read/decode tasks and Train workers at
# once; with logical CPUs = physical cores, a 2-core laptop deadlocks waiting for a free CPU.
# Ray's CPU resource is a scheduling token, so a local instance gets at least this many.
MIN_LOCAL_LOGICAL_CPUS = 8


def local_num_cpus(cfg: RayConfig) -> int:
    """Logical CPUs for a local Ray instance: ``cfg.num_cpus``, else max(cores, 8)."""
    if cfg.num_cpus:
        return cfg.num_cpus
    return max(os.cpu_count() or 1, MIN_LOCAL_LOGICAL_CPUS)


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
