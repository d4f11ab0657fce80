"""Starting or joining Ray, what the console shows, and asking what the cluster offers.

Console policy (issue 20): progress on every long step, each summary once, no Ray noise. Ray's own
output is set through its public switches only:

* Ray >= 2.52 enables token authentication by default for a local ``ray.init()`` and logs a notice
  saying so on every start: the default is kept, the notice's logger is set to ERROR.
* Ray Data progress bars: ``RAY_DATA_DISABLE_PROGRESS_BARS=1`` when stdout is not a terminal (Ray
  Data then dumps multi-line progress blocks into logs); on a terminal only the global bar
  (``DataContext.enable_operator_progress_bars = False``). Workers get both through the job's
  ``runtime_env`` and the worker setup hook.
* ``HF_HUB_DISABLE_PROGRESS_BARS=1``: Hugging Face's bars for loading local weights.
* Each worker process learns its own cluster's address (``RAY_ADDRESS``): Ray Train V2's controller
  and state actor ask the State API for actor liveness with no address, which raises "Found
  multiple active Ray instances" whenever a second local Ray runs on the machine.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time

from pacl_ray.config import RayConfig

SETUP_HOOK = "pacl_ray.stages.runtime.setup_worker"
AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def interactive() -> bool:
    """Whether the console is a terminal (progress bars) rather than a log file (progress lines)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def quiet_env() -> dict[str, str]:
    """Environment variables (Ray's public switches) that keep workers' console output readable."""
    # Hugging Face's per-load bars ("Loading weights 103/103") are instant for local models.
    env = {"RAY_TRAIN_V2_ENABLED": os.environ.get("RAY_TRAIN_V2_ENABLED", "1"),
           "HF_HUB_DISABLE_PROGRESS_BARS": os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "1")}
    if not interactive():
        env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
        env["RAY_COLOR_PREFIX"] = "0"  # no ANSI colour codes around worker log prefixes in files
    return env


def configure_driver_console() -> None:
    """Ray Data's progress in this process: off in logs (with its INFO lines), the global bar only
    on a terminal."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_operator_progress_bars = False
    if not interactive():
        ctx.enable_progress_bars = False
        # Each execution's start/plan/finish lines (with a path into Ray's session folder): the
        # stages print one summary per step instead.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # ... and its notice that the bars are off (they are off on purpose here).
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def init_ray(cfg: RayConfig | None = None) -> None:
    """Join ``cfg.address`` (or ``RAY_ADDRESS``), or start a fresh local instance; a no-op if
    connected. Sets Ray's console switches (module docstring) first."""
    import ray

    for key, value in quiet_env().items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        configure_driver_console()
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    # Keep the driver's log quiet; progress lines and stage summaries are what users read.
    kwargs = dict(include_dashboard=False, log_to_driver=True, configure_logging=False,
                  runtime_env={"worker_process_setup_hook": SETUP_HOOK, "env_vars": quiet_env()})
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Token authentication is Ray's default for a local instance (kept); its notice saying so
        # is logged at WARNING on every start. (Setting RAY_AUTH_MODE=token here instead would come
        # too late: Ray caches the mode when it is imported.)
        logging.getLogger(AUTH_NOTICE_LOGGER).setLevel(logging.ERROR)
        # address="local": always a fresh instance, never one that happens to run on this machine.
        ray.init(address="local", num_cpus=local_num_cpus(cfg), num_gpus=cfg.num_gpus, **kwargs)
    configure_driver_console()


# Ray Train V2's PlacementGroupCleaner asks the State API (served by the dashboard) every second
# whether the controller lives; a local instance here runs without the dashboard, so it would
# print a warning every second of every training run.
# Ray Train V2's controller also logs each resource request and worker-group start at INFO; the
# training stage prints its own plan and per-epoch lines.
QUIETED_LOGGERS = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": "ERROR",
    "ray.train.v2._internal.execution.scaling_policy.scaling_policy": "WARNING",
    "ray.train.v2._internal.execution.worker_group.worker_group": "WARNING",
    # Train's per-report echoes: the TrainingReport repr (600-900 characters) of every report,
    # each checkpoint's path and the device move; the stage's run.log lines say the same briefly.
    # (this module's logger is named by its file path: see _logger_name)
    "ray.train.v2._internal.execution.context": "WARNING",
    "ray.train.v2._internal.execution.storage": "WARNING",
    "ray.train.v2.torch.train_loop_utils": "WARNING",
}


def setup_worker() -> None:
    """Ray worker-process setup hook: the process's own cluster address in ``RAY_ADDRESS`` (so
    State API calls without an address find this cluster, not "multiple active Ray instances"),
    Ray Data's compact progress, and the loggers in QUIETED_LOGGERS silenced."""
    import ray

    try:
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 -- the hook must never kill a worker; the address is a nicety
        pass
    configure_driver_console()
    for name, level in QUIETED_LOGGERS.items():
        logger = logging.getLogger(_logger_name(name))
        logger.setLevel(level)
        # Ray Train re-applies its logging config (dictConfig) in its worker and controller
        # processes, which resets the levels of loggers below `ray.train` but keeps their filters.
        logger.addFilter(_AtLeast(logging.getLevelName(level)))


# Modules whose logger is getLogger(__file__) rather than getLogger(__name__).
FILE_NAMED_LOGGERS = ("ray.train.v2._internal.execution.context",)


def _logger_name(module: str) -> str:
    """The name ``module`` logs under: its dotted name, or its file path for FILE_NAMED_LOGGERS."""
    if module in FILE_NAMED_LOGGERS:
        import importlib.util

        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin:
            return spec.origin
    return module


class _AtLeast(logging.Filter):
    """Drops a logger's records below ``level`` (survives logging.config.dictConfig)."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


quiet_worker_logs = setup_worker  # the hook's earlier name (conftest and old runtime_envs use it)


class Progress:
    """Progress of one long step: a tqdm bar on a terminal, else a line with counts, rate and ETA
    at most every ``interval`` seconds (and at the end), so a log shows progress at least that
    often while the step advances. ``update(n)`` adds done units; ``close()`` prints the last count if not yet shown.
    Lines go to stderr, prefixed with ``label``."""

    def __init__(self, label: str, total: int, unit: str = "it", interval: float = 10.0,
                 enabled: bool = True, stream=None):
        self.label, self.total, self.unit, self.interval = label, max(0, int(total)), unit, interval
        self.enabled, self.stream = enabled, stream
        self.done, self.start = 0, time.monotonic()
        self._last, self._shown = self.start, -1
        self._bar = None
        if enabled and interactive():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=label, unit=unit, leave=False, file=stream or sys.stderr)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last >= self.interval:
            self._line()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 and self.total else math.nan
        eta_text = f", ETA {eta:.0f} s" if math.isfinite(eta) and self.done < self.total else ""
        return (f"{self.label}: {self.done}/{self.total} {self.unit} [{elapsed:.0f} s, "
                f"{rate:.2f} {self.unit}/s{eta_text}]")

    def _line(self) -> None:
        self._last, self._shown = time.monotonic(), self.done
        print(self.line(), file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self.enabled and self._shown != self.done:
            self._line()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
