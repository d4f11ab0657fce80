"""Starting or joining Ray, what the console shows, and asking what the cluster offers.

Console policy (issue 20): progress on every long step, each summary once, no Ray noise. Ray's own
output is set through its public switches only (Ray's "Configuring Logging" guide, the Ray AIR
environment variables, ``ray.train.LoggingConfig``):

* Log deduplication (read when Ray is imported, so :func:`init_ray` sets them first; see
  :func:`console_env`): ``RAY_DEDUP_LOGS_SKIP_REGEX`` drops the lines in :data:`SKIPPED_LINES`,
  Ray's own notices that are expected on a machine that runs many actors on few cores. In logs
  (stdout not a terminal) ``RAY_DEDUP_LOGS_ALLOW_REGEX`` lets every other line through as it comes:
  the "[repeated 7x across cluster]" suffix is ANSI-coloured and its batch repeats lines already
  printed. ``RAY_COLOR_PREFIX=0``: no colour codes around worker prefixes in logs.
* Tune: ``RAY_AIR_NEW_OUTPUT=0`` with ``RunConfig(verbose=0)`` (the sweep driver): the new output
  engine prints its experiment box and a TensorBoard hint into Ray's session folder even at
  verbosity 0; the sweep prints its own TensorBoard folder. ``TUNE_WARN_THRESHOLD_S=30`` (read
  when Tune is imported): no "may be a performance bottleneck" warning for a loop step under 30 s.
* Ray Train: ``RunConfig(logging_config=ray.train.LoggingConfig(log_level="WARNING"))`` in the
  training stage (report echoes, resource requests, in Train's controller and worker processes).
* Ray Data (public logger ``ray.data``, ``DataContext``): its progress is logged as multi-line
  blocks when stdout is not a terminal, so there the ``ray.data`` logger is at WARNING (the stages
  print one summary per step, and :class:`Progress` lines); on a terminal, its bars.
* Ray >= 2.52 enables token authentication by default for a local ``ray.init()`` and logs a notice
  saying so on every start: the default is kept, the notice's logger is set to ERROR.
* ``HF_HUB_DISABLE_PROGRESS_BARS=1``: Hugging Face's bars for loading local weights.
* Each worker process learns its own cluster's address (``RAY_ADDRESS``): Ray Train V2's controller
  and state actor ask the State API for actor liveness with no address, which raises "Found
  multiple active Ray instances" whenever a second local Ray runs on the machine.

Workers get the environment through the job's ``runtime_env`` and the rest through the worker
process setup hook (:func:`setup_worker`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time

from pacl_ray.config import RayConfig

SETUP_HOOK = "pacl_ray.stages.runtime.setup_worker"
AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
# Ray's own notices that say nothing actionable here, dropped from the console (they stay in the
# session's log files):
# * the raylet's "N PYTHON worker processes have been started on node ... This could be a result
#   of using a large number of actors" (a pipeline's actor pools, Train workers and Tune trials on
#   a few cores);
# * core_worker's note that the actor Ray Train itself creates (its PreemptionWatcher) has
#   constructor arguments in the object store (ray-project/ray#53727);
# * Ray Train's placement-group cleaner, which asks the State API every second whether its
#   controller lives and warns each time it cannot: the State API is served by the dashboard,
#   which a local instance here runs without (it needs packages the project does not install);
# * Ray Train's echo of every report, a TrainingReport repr of 600-900 characters: its logger is
#   named by its file path, so ray.train.LoggingConfig (by logger name) does not reach it, and
#   Train's workers log the root logger's INFO records to the console (the training stage prints
#   a line per logged step instead).
SKIPPED_LINES = (
    r"PYTHON worker processes have been started",
    r"class name: 'PreemptionWatcher'.*constructor arguments in the object store",
    r"Failed to query Ray Train Controller actor state",
    r"Reporting training result \d+: TrainingReport\(",
)


def interactive() -> bool:
    """Whether the console is a terminal (progress bars) rather than a log file (progress lines)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def console_env() -> dict[str, str]:
    """Environment variables (Ray's public switches) of the driver's console: log deduplication
    (read when Ray is imported) and Tune's output engine. See the module docstring."""
    skip = "|".join(SKIPPED_LINES)
    env = {"RAY_DEDUP_LOGS_SKIP_REGEX": skip, "RAY_AIR_NEW_OUTPUT": "0",
           # Tune warns of any event-loop step over 0.5 s ("... may be a performance bottleneck"),
           # routine when trials share a few cores; a stall longer than its heartbeat still warns.
           "TUNE_WARN_THRESHOLD_S": "30"}
    if not interactive():
        # Every line not skipped is "allowed": printed as it comes, never batched with a suffix.
        env["RAY_DEDUP_LOGS_ALLOW_REGEX"] = f"^(?!.*(?:{skip}))"
        env["RAY_COLOR_PREFIX"] = "0"
    return env


def set_console_env() -> None:
    """Put :func:`console_env` into this process's environment (values already set win). Call
    before anything imports Ray: Ray reads the deduplication switches at import."""
    for key, value in console_env().items():
        os.environ.setdefault(key, value)


def skipped_line(line: str) -> bool:
    """Whether Ray drops ``line`` from the console under :func:`console_env` (tests)."""
    return re.search("|".join(SKIPPED_LINES), line) is not None


def quiet_env() -> dict[str, str]:
    """Environment variables (public switches) that keep workers' console output readable."""
    # Hugging Face's per-load bars ("Loading weights 103/103") are instant for local models.
    env = {"RAY_TRAIN_V2_ENABLED": os.environ.get("RAY_TRAIN_V2_ENABLED", "1"),
           "HF_HUB_DISABLE_PROGRESS_BARS": os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "1")}
    if not interactive():
        env["RAY_COLOR_PREFIX"] = "0"  # no ANSI colour codes around worker log prefixes in files
    return env


def configure_driver_console() -> None:
    """Ray Data's progress in this process: bars on a terminal; in logs, where Ray Data would log
    multi-line progress blocks every 10 s (and its start/plan/finish lines, with a path into Ray's
    session folder), its logger at WARNING: the stages print one summary per step instead."""
    import importlib

    importlib.import_module("ray.data")  # configures its logger, which the level below adjusts
    if not interactive():
        logging.getLogger("ray.data").setLevel(logging.WARNING)


class RayStartError(RuntimeError):
    """Ray could not be started or joined (e.g. a local node timing out at start on a loaded
    machine). Nothing already done is lost: every finished stage is cached, and the same command
    resumes."""


def init_ray(cfg: RayConfig | None = None) -> None:
    """Join ``cfg.address`` (or ``RAY_ADDRESS``), or start a fresh local instance; a no-op if
    connected. Sets Ray's console switches (module docstring) first.

    Raises:
        RayStartError: ``ray.init`` failed; the message says what Ray said and what to try."""
    set_console_env()
    for key, value in quiet_env().items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        configure_driver_console()
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    # Keep the driver's log quiet; progress lines and stage summaries are what users read.
    kwargs = dict(log_to_driver=True, configure_logging=False,
                  runtime_env={"worker_process_setup_hook": SETUP_HOOK, "env_vars": quiet_env()})
    # A start on a busy machine can take tens of seconds: a line every PROGRESS_INTERVAL_S then.
    if address:
        from pacl_ray.formats.storage import redact

        with watched("[ray]", phase=f"joining the Ray cluster at {redact(address)}"), _start_errors(
                f"could not join the Ray cluster at {redact(address)}",
                "check that the cluster is up (`ray status`) and that ray.address / RAY_ADDRESS names it"):
            ray.init(address=address, **kwargs)
    else:
        # Token authentication is Ray's default for a local instance (kept); its notice saying so
        # is logged at WARNING on every start. (Setting RAY_AUTH_MODE=token here instead would come
        # too late: Ray caches the mode when it is imported.)
        logging.getLogger(AUTH_NOTICE_LOGGER).setLevel(logging.ERROR)
        # address="local": always a fresh instance, never one that happens to run on this machine.
        with watched("[ray]", phase="starting a local Ray instance"), _start_errors(
                "could not start a local Ray instance",
                "retry the same command (on a loaded machine Ray's node can time out at start); stop "
                "other heavy jobs or lower ray.num_cpus; Ray's logs are under /tmp/ray/session_latest/logs"):
            ray.init(address="local", num_cpus=local_num_cpus(cfg), num_gpus=cfg.num_gpus,
                     include_dashboard=False, **kwargs)
    if _stop.wanted:
        install_stop_handlers()  # ray.init replaced the SIGTERM handler (stop_handlers docstring)
    configure_driver_console()


# --------------------------------------------------------------------------- stop signals


class _stop:
    wanted = False  # the command line asked for stop_handlers (a library caller keeps its own)
    received = 0  # the first stop signal received (signal.SIGINT or signal.SIGTERM), 0 if none


def install_stop_handlers(reset: bool = False) -> None:
    """SIGTERM (``timeout``, ``docker stop``, Slurm, ``ray job stop``) is handled like a Ctrl-C outside
    ``Tuner.fit`` (KeyboardInterrupt, :func:`_on_stop_signal`) and both are remembered (:func:`stop_signal`), so the command line reports an interrupted run and
    exits 128 + the signal's number. Called by the command line at its start, and again by
    :func:`init_ray` after ``ray.init``: Ray's driver replaces the SIGTERM handler (``ray.init``
    installs one that exits, its C++ core worker an Abseil failure handler that dumps every
    thread's stack and ends the process with 139). Ray's public switch for that handler,
    ``RAY_DISABLE_FAILURE_SIGNAL_HANDLER=1``, is not set: it would also drop the stack dumps of real
    crashes (SIGSEGV) in every Ray process; replacing the driver's SIGTERM handler is enough (Ray's
    other processes block SIGINT and exit quietly on SIGTERM). Main thread only (Python's rule).
    ``reset``: forget a signal received before (a new command in the same process)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    _stop.wanted = True
    if reset:
        _stop.received = 0
    signal.signal(signal.SIGTERM, _on_stop_signal)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_stop_signal)


def _on_stop_signal(signum: int, frame) -> None:
    """Remember the first stop signal and raise KeyboardInterrupt in the main thread.

    SIGTERM does not take Ray Tune's graceful path (its SIGINT handler saves the experiment and
    then stops each trial, about 10 s on a small machine): whoever sends SIGTERM often sends it to
    Ray's own processes too (Slurm, a process group) and kills for good soon after (``docker
    stop``: 10 s), and that path waits on the cluster. Tune saves the experiment as it runs, and
    training resumes from its checkpoint, so stopping at once loses no finished work."""
    _stop.received = _stop.received or signum
    raise KeyboardInterrupt


def note_stop_signal(signum: int) -> None:
    """Record a stop signal that another handler received (Ray Tune's SIGINT handler)."""
    _stop.received = _stop.received or signum


def stop_signal() -> int:
    """The first stop signal received since :func:`install_stop_handlers` (0: none)."""
    return _stop.received


SHUTDOWN_GRACE_S = 20.0  # an interrupted command's exit: longest wait for Ray's shutdown


def exit_within(status: int, seconds: float = SHUTDOWN_GRACE_S) -> None:
    """Make sure an interrupted command ends with ``status`` within ``seconds``: a daemon timer
    ends the process then if Ray's atexit shutdown still waits. A SIGTERM sent to the whole process
    group (Slurm, ``kill -- -PGID``) kills Ray's GCS as well, and the driver's shutdown would then
    wait 60 s for it and exit 1. Ray's local processes are bound to the driver (kernel
    fate-sharing), so they go with it."""
    import threading

    def end() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    timer = threading.Timer(seconds, end)
    timer.daemon = True
    timer.start()


def ignore_stop_signals() -> None:
    """While an interrupted command shuts down (Ray's atexit ``shutdown`` kills its processes), a
    further Ctrl-C or SIGTERM must not end it in a traceback: both are ignored from here on."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _start_errors:
    """Turns an exception of ``ray.init`` into :class:`RayStartError` with what to try."""

    def __init__(self, what: str, advice: str):
        self.what, self.advice = what, advice

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, err, tb) -> bool:
        if err is None or isinstance(err, (KeyboardInterrupt, SystemExit, RayStartError)):
            return False
        said = " ".join(str(err).split()) or type(err).__name__
        raise RayStartError(f"{self.what}: {said}; nothing already done is lost (finished stages are "
                            f"cached and the same command resumes); {self.advice}") from err


def setup_worker() -> None:
    """Ray worker-process setup hook: the process's own cluster address in ``RAY_ADDRESS`` (so
    State API calls without an address find this cluster, not "multiple active Ray instances"),
    Ray Data's console (:func:`configure_driver_console`) and timm's INFO lines off."""
    import ray

    try:
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 -- the hook must never kill a worker; the address is a nicety
        pass
    configure_driver_console()
    # Ray Train's workers log the root logger's INFO records to the console: timm's "Loaded ...
    # from checkpoint '<path>'" for every backbone build (the stages say what they load).
    logging.getLogger("timm").setLevel(logging.WARNING)
    sys.unraisablehook = quiet_exit_unraisable


def quiet_exit_unraisable(unraisable: "sys.UnraisableHookArgs") -> None:
    """``sys.unraisablehook`` of Ray's worker processes: a ``SystemExit`` that cannot propagate
    is dropped; anything else goes to Python's default hook. Why: Ray ends a finished trial's actor
    with SIGTERM, and its worker's handler raises ``SystemExit``; when the signal lands while a
    weakref callback or finalizer runs, Python prints "Exception ignored in ... SystemExit: 1"
    with a traceback on the console, about a process that is exiting as it should."""
    if isinstance(unraisable.exc_value, SystemExit):
        return
    sys.__unraisablehook__(unraisable)


def echo(line: str) -> None:
    """Print ``line`` once from a Ray Train worker. Train V2 replaces ``print`` in its workers by
    one that logs through its console handler (stderr) and, because Ray's workers replace
    ``sys.stdout``, also prints: every line would reach the driver's console twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


quiet_worker_logs = setup_worker  # the hook's earlier name (conftest and old runtime_envs use it)


# Seconds between progress lines in logs (issue 20: progress at least every 30 s; a step shorter
# than this prints none). Tests set it small.
PROGRESS_INTERVAL_S = 10.0


class Progress:
    """Progress of one long step: a tqdm bar on a terminal, else a line with counts, rate and ETA
    at most every ``interval`` seconds (and at the end), so a log shows progress at least that
    often while the step advances. ``update(n)`` adds done units; ``close()`` prints the last count
    if not yet shown (with ``final=False`` only when a line was shown before: a step that ends
    within ``interval`` prints nothing). Lines go to stderr, prefixed with ``label``; ``interval``
    None: :data:`PROGRESS_INTERVAL_S`.

    ``total=0``: the total is not known (no ETA). ``phase``: the sub-step running now, for work
    that runs in steps with no count of their own (a Ray Data job, k-means++ init); while set, a
    line says ``<label>: still running: <phase>, <s> s; <count so far>`` (the counts of an
    earlier, counted part) instead of a rate, and ``close()`` adds no line (the step's own summary
    follows). With :class:`Watch` a line comes at least every ``interval`` seconds even while the
    count stands still."""

    def __init__(self, label: str, total: int, unit: str = "it", interval: float | None = None,
                 enabled: bool = True, stream=None, final: bool = True, phase: str = ""):
        self.label, self.total, self.unit = label, max(0, int(total)), unit
        self.interval = PROGRESS_INTERVAL_S if interval is None else interval
        import threading

        self.enabled, self.stream, self.final = enabled, stream, final
        self._lock = threading.Lock()  # the loop and a Watch's thread both update: one line at a time
        self.done, self.start = 0, time.monotonic()
        self._last, self._shown = self.start, -1
        self._bar = None
        if enabled and interactive():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total or None, desc=label, unit=unit, leave=False,
                             file=stream or sys.stderr)
        self.phase = phase

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, text: str) -> None:
        self._phase = text
        if self._bar is not None:  # a terminal: the bar's description says what runs now
            self._bar.set_description(f"{self.label} {text}" if text else self.label)

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
            elif self.enabled and time.monotonic() - self._last >= self.interval:
                self._line()

    def counts(self) -> str:
        """``done/total unit`` (``done unit`` when the total is unknown)."""
        return f"{self.done}/{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}"

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        head = self.label + (" " if self.label.endswith("]") else ": ")  # "[ingest] ...", "[world] fit: ..."
        if self.phase:
            so_far = f"; {self.counts()}" if self.done or self.total else ""
            return f"{head}still running: {self.phase}, {elapsed:.0f} s{so_far}"
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 and self.total else math.nan
        eta_text = f", ETA {eta:.0f} s" if math.isfinite(eta) and self.done < self.total else ""
        return f"{head}{self.counts()} [{elapsed:.0f} s, {rate:.2f} {self.unit}/s{eta_text}]"

    def _line(self) -> None:
        self._last, self._shown = time.monotonic(), self.done
        stream = self.stream or sys.stderr
        stream.write(self.line() + "\n")  # one write: print's separate newline can interleave
        stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
            if self.enabled and not self.phase and self._shown != self.done and (self.final or self._shown >= 0):
                self._line()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Watch:
    """Progress of work whose count is read rather than pushed (a Ray Data write; a loop whose
    batches can each take longer than the interval), or of work with no count at all (``count``
    None: a heartbeat for ``progress.phase``): while the ``with`` block runs, a daemon thread sets
    ``progress``'s count to ``count()`` every ``interval`` seconds (a count that fails, e.g. on a
    file still being written, is retried at the next poll), so ``progress`` prints a line at least
    that often even while the count stands still; on exit a last poll, then ``progress.close()``.
    A block that ends within ``interval`` (and a ``final=False`` progress) prints nothing.
    ``interval`` None: the progress's own."""

    def __init__(self, progress: Progress, count=None, interval: float | None = None):
        import threading

        self.progress, self.count = progress, count
        self.interval = progress.interval if interval is None else interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pacl-progress", daemon=True)

    def poll(self) -> None:
        try:
            done = self.progress.done if self.count is None else int(self.count())
        except Exception:  # noqa: BLE001 -- progress must never fail the step it watches
            return
        self.progress.update(max(0, done - self.progress.done))  # prints if the interval has passed

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def __enter__(self) -> "Watch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        self.progress.close()


def watched(label: str, total: int = 0, unit: str = "", count=None, phase: str = "",
            interval: float | None = None, stream=None) -> Watch:
    """A :class:`Watch` over a fresh ``final=False`` :class:`Progress`: a line at least every
    ``interval`` seconds (:data:`PROGRESS_INTERVAL_S`) while the ``with`` block runs, nothing for
    a block shorter than that.
    ``with watched("[ingest]", phase="validating records") as watch: ...; watch.progress.phase =
    "writing pairs"`` (see :class:`Progress` for the line's form)."""
    progress = Progress(label, total, unit, interval=interval, stream=stream, final=False, phase=phase)
    return Watch(progress, count, interval=interval)


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
