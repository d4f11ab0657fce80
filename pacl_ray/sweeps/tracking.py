"""What a sweep reports while it runs: a progress line per trial, and opt-in experiment trackers.

* :class:`TrialProgress` (a ``ray.tune.Callback``) prints one line when a trial starts, finishes or
  fails, and a heartbeat with counts, elapsed time and an ETA at least every 30 s while trials run;
  Tune's own status tables are off (``RunConfig(verbose=0)``).
* :func:`tracking_callbacks` turns on MLflow and W&B through Ray Tune's own logger callbacks
  (``ray.air.integrations.mlflow.MLflowLoggerCallback``, ``ray.air.integrations.wandb.
  WandbLoggerCallback``) from the ``tracking`` config section. Runs are named after the trial
  (:func:`pacl_ray.sweeps.driver.run_label`: trial, objective, sigma, K, tau) by the Tuner's
  ``trial_name_creator``; their params are the trial's hyperparameters (Tune's ``param_space``).
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Any, Callable

from ray.tune import Callback

HEARTBEAT_S = 30.0


class TrialProgress(Callback):
    """One line per trial start/end and a heartbeat every ``HEARTBEAT_S`` while trials run."""

    def __init__(self, total: int, log: Callable[[str], None] = print, heartbeat_s: float = HEARTBEAT_S):
        self.total, self.heartbeat_s = total, heartbeat_s
        # Tune pickles its callbacks with the experiment; a builtin (print) is looked up at call
        # time instead: Ray may have replaced builtins.print by then, and the original then does
        # not pickle ("not the same object as builtins.print").
        builtin_print = getattr(log, "__module__", None) == "builtins" and getattr(log, "__name__", "") == "print"
        self._log = None if builtin_print else log
        self.start = self.last = time.monotonic()
        self.done_before: int | None = None  # trials finished before this launch (a restored sweep's)

    def setup(self, **info) -> None:
        """Tune calls this at the start of every launch, a restored sweep's included (whose
        callbacks come back unpickled, with the first launch's clock): the ``[N s]`` stamps and the
        ETA count from this launch and over the trials it runs."""
        self.start = self.last = time.monotonic()
        self.done_before = None

    def log(self, message: str) -> None:
        (self._log or print)(message)

    @staticmethod
    def _name(trial: Any) -> str:
        return str((getattr(trial, "config", None) or {}).get("trial", trial))

    def _counts(self, trials: list, ended: Any = None) -> str:
        # Tune calls on_trial_complete/on_trial_error before it sets the ending trial's status,
        # so that trial (``ended``) is counted as done here, not as running.
        done = sum(t is ended or t.status in ("TERMINATED", "ERROR") for t in trials)
        running = sum(t is not ended and t.status == "RUNNING" for t in trials)
        if self.done_before is None:  # the first line of this launch: what an earlier one finished
            self.done_before = done - (ended is not None)
        elapsed = time.monotonic() - self.start
        done_here = done - self.done_before
        eta = ""
        if 0 < done_here and done < self.total:
            eta = f", ETA {elapsed / done_here * (self.total - done):.0f} s"
        return f"{done}/{self.total} trials done, {running} running [{elapsed:.0f} s{eta}]"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self.log(f"[tune] trial {self._name(trial)} started; {self._counts(trials)}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self.log(f"[tune] trial {self._name(trial)} finished; {self._counts(trials, trial)}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self.log(f"[tune] trial {self._name(trial)} failed (see the sweep report); {self._counts(trials, trial)}")

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        now = time.monotonic()
        if now - self.last >= self.heartbeat_s:
            self.last = now
            self.log(f"[tune] {self._counts(trials)}")


def tracking_callbacks(tracking: dict, experiment: str, sweep_dir: str | None = None,
                       log: Callable[[str], None] | None = None) -> list:
    """Ray Tune logger callbacks for the trackers the ``tracking`` section turns on (none by
    default). ``tracking.mlflow_uri`` (e.g. ``file:///path/mlruns``, ``http://host:5000``) logs each
    trial's hyperparameters and reported metrics to MLflow experiment ``tracking.mlflow_experiment``
    (default: the sweep's name); ``tracking.wandb_project`` does the same for W&B in
    ``tracking.wandb_mode``: ``offline`` (the default) needs no account or network and writes one
    run folder per trial under ``{sweep_dir}/wandb/`` for a local ``sweep_dir`` (else under each
    trial's folder), which ``wandb sync`` uploads later. ``log`` is told where offline runs go.

    Raises ImportError naming the package to install when a tracker is on but missing."""
    callbacks: list = []
    if tracking.get("mlflow_uri"):
        try:
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            importlib.import_module("mlflow")  # Ray's callback imports it lazily; fail here, clearly
        except ImportError as err:
            raise ImportError(f"tracking.mlflow_uri is set but MLflow is not installed ({err}); "
                              "pip install mlflow") from err
        callbacks.append(MLflowLoggerCallback(
            tracking_uri=tracking["mlflow_uri"],
            experiment_name=tracking.get("mlflow_experiment") or experiment,
            tags={"sweep": experiment}, save_artifact=False))
    if tracking.get("wandb_project"):
        callbacks.append(_wandb_callback(tracking, experiment, sweep_dir, log))
    return callbacks


def _wandb_callback(tracking: dict, experiment: str, sweep_dir: str | None,
                    log: Callable[[str], None] | None) -> Any:
    """Ray's WandbLoggerCallback for ``tracking`` (see :func:`tracking_callbacks`)."""
    try:
        from ray.air.integrations.wandb import WandbLoggerCallback

        importlib.import_module("wandb")
    except ImportError as err:
        raise ImportError(f"tracking.wandb_project is set but wandb is not installed ({err}); "
                          "pip install wandb") from err
    from pacl_ray.formats import storage

    mode = tracking.get("wandb_mode") or "offline"
    if mode in ("offline", "disabled"):
        # Ray's callback asks for an API key at setup unless W&B's own WANDB_MODE says that no
        # server is used; the mode argument alone reaches only wandb.init.
        os.environ["WANDB_MODE"] = mode
    # W&B's banner, per-run summary table and sync hint would reach the console through each
    # logging actor's output (the console policy of pacl_ray.stages.runtime); the line below
    # says where the runs are instead. Its system-metrics sampler and code/requirements capture
    # are off: a trial's hyperparameters and metrics are what is tracked.
    kwargs: dict = {"settings": {"silent": True, "console": "off", "x_disable_stats": True,
                                 "disable_code": True, "disable_git": True, "x_save_requirements": False}}
    where = "each trial's folder under wandb/"
    if sweep_dir and not storage.is_remote(sweep_dir):
        local = storage.resolve(sweep_dir)[1]
        os.makedirs(local, exist_ok=True)
        kwargs["dir"] = local  # W&B adds wandb/<mode>-run-<time>-<trial id> below it
        where = os.path.join(local, "wandb")
    if log is not None and mode == "offline":
        log(f"[tune] W&B offline runs: {where} (upload with `wandb sync <run folder>`)")
    return WandbLoggerCallback(project=tracking["wandb_project"], group=experiment, mode=mode, **kwargs)
