"""Where the worker loop runs: Ray Train's workers, or the calling process (issue #21).

A sweep trial that trains on one CPU worker would start two more processes (Ray Train's controller
and its worker), each importing torch, timm and this package before the first step: on a 2-core
machine most of a trial's start-up. :func:`runs_in_process` picks the calling process for such a
launch instead, and :class:`InProcessWorker` gives the loop what Ray Train's worker context gives
it: rank 0 of 1, the CPU device, the model as ``prepare_model`` leaves it at one worker (moved, no
DDP), and reports whose checkpoints are persisted to the run directory. Any other launch (more than
one worker, an elastic range, GPUs, or Ray Train callbacks such as Tune's report callback for
ASHA) goes to Ray Train's ``TorchTrainer`` unchanged (:class:`RayTrainWorker`).

Ray Train V2's own local mode (``ScalingConfig(num_workers=0)``) is not used: inside a Tune trial
its ``ray.train.report``/``get_checkpoint``/``get_context`` raise (they refuse a Tune session), it
persists no checkpoint and it has no failure retries.

Checkpoints of in-process launches go to ``<run>/checkpoints/step_<global step>/`` (the same
``state.pt`` as Ray Train's, plus ``counters.json``, written last: a directory without it is an
unfinished copy), the newest :data:`KEEP_CHECKPOINTS` kept, as Ray Train's ``num_to_keep``. Every
checkpoint, of either kind, carries ``counters.json``, so a relaunch finds the run's latest one in
either place (:func:`latest_checkpoint`) whichever way the earlier launch ran: nothing trained is
lost when a run moves between one and several workers. Failures: an in-process launch retries
after an exception up to ``train.max_failures`` times from its latest checkpoint
(:func:`run_with_retries`), as Ray Train's ``FailureConfig`` does for its workers; a process that
dies takes the trial with it, and Tune's trial retry resumes from the same checkpoint.
"""

from __future__ import annotations

import json
import os
import posixpath
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch

from pacl_ray.formats import storage
from pacl_ray.stages.checkpoint import STATE_FILE, load_state

COUNTERS_FILE = "counters.json"
IN_PROCESS_DIR = "checkpoints"  # in-process launches' checkpoints, in the run directory
RAY_TRAIN_DIR = "ray_train"  # Ray Train's run name: its checkpoints live in <run>/ray_train/
KEEP_CHECKPOINTS = 2


def runs_in_process(num_workers: int, max_workers: Optional[int], use_gpu: bool, callbacks: Optional[list]) -> bool:
    """True for a launch of exactly one CPU worker without an elastic range or Ray Train callbacks."""
    return num_workers == 1 and not max_workers and not use_gpu and not callbacks


def worker_threads(resources_per_worker: dict) -> int:
    """The intra-op threads a Ray Train worker of these resources gets (Ray sets its
    ``OMP_NUM_THREADS`` to the worker's CPUs, 1 by default); an in-process launch uses as many,
    so that its float results are the same (a reduction's order depends on the thread count)."""
    return max(1, int(resources_per_worker.get("CPU", 1)))


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- checkpoints


def write_counters(directory: str, counters: dict) -> None:
    """``counters.json`` into a local checkpoint directory (its data position, readable without
    loading ``state.pt``)."""
    with open(os.path.join(directory, COUNTERS_FILE), "w") as handle:
        json.dump(counters, handle)


def _checkpoint_dirs(run_uri: str, kind: str) -> list[str]:
    """Checkpoint directories (URIs) under ``<run>/<kind>``: those holding a ``state.pt``."""
    files = storage.list_files(storage.join(run_uri, kind), suffix="/" + STATE_FILE)
    return [f[:-len(STATE_FILE) - 1] for f in files]


def _global_step(checkpoint_uri: str, kind: str) -> Optional[int]:
    counters = storage.join(checkpoint_uri, COUNTERS_FILE)
    if storage.exists(counters):
        return int(json.loads(storage.read_text(counters))["global_step"])
    if kind == IN_PROCESS_DIR:
        return None  # an unfinished copy (counters.json is written last)
    # A Ray Train checkpoint written before checkpoints carried counters.json: read the state.
    with checkpoint_directory(checkpoint_uri) as directory:
        return int(load_state(directory)["counters"]["global_step"])


def latest_checkpoint(run_uri: str,
                      kinds: tuple[str, ...] = (IN_PROCESS_DIR, RAY_TRAIN_DIR)) -> Optional[tuple[int, str]]:
    """(global step, URI) of the run's checkpoint with the highest global step among ``kinds``
    (:data:`IN_PROCESS_DIR`, :data:`RAY_TRAIN_DIR`); None when there is none."""
    best: Optional[tuple[int, str]] = None
    for kind in kinds:
        for uri in _checkpoint_dirs(run_uri, kind):
            step = _global_step(uri, kind)
            if step is not None and (best is None or step > best[0]):
                best = (step, uri)
    return best


def as_checkpoint(uri: Optional[str]):
    """A checkpoint directory's URI as a Ray ``Checkpoint`` (path in its filesystem, as Ray Train's
    own); None for None."""
    from ray.train import Checkpoint

    if uri is None:
        return None
    fs, path = storage.resolve(uri)
    return Checkpoint(path, filesystem=fs)


@contextmanager
def checkpoint_directory(uri: str) -> Iterator[str]:
    """A local directory with the checkpoint's files (the directory itself for a local path;
    a temporary copy for remote storage, through Ray's ``Checkpoint.as_directory``)."""
    with as_checkpoint(uri).as_directory() as directory:
        yield directory


def persist_checkpoint(local_dir: str, run_uri: str, global_step: int) -> str:
    """Copy a local checkpoint directory to ``<run>/checkpoints/step_<global_step>``
    (``counters.json`` last), keep the newest :data:`KEEP_CHECKPOINTS`; returns its URI."""
    import pyarrow.fs as pafs

    target = storage.join(run_uri, IN_PROCESS_DIR, f"step_{global_step:09d}")
    storage.delete_dir(target)  # a copy an earlier launch left unfinished at this step
    fs, path = storage.resolve(target)
    fs.create_dir(path, recursive=True)
    names = sorted(os.listdir(local_dir), key=lambda n: n == COUNTERS_FILE)  # counters.json last
    for name in names:
        pafs.copy_files(os.path.join(local_dir, name), posixpath.join(path, name),
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    root = storage.join(run_uri, IN_PROCESS_DIR)
    steps = sorted({posixpath.basename(posixpath.dirname(f)) for f in storage.list_files(root)})
    for old in steps[:-KEEP_CHECKPOINTS]:
        storage.delete_dir(storage.join(root, old))
    return target


# --------------------------------------------------------------------------- the two kinds of worker


class RayTrainWorker:
    """The loop's view of a Ray Train worker (rank, device, restored checkpoint, report)."""

    in_process = False

    def __init__(self):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def restored_state(self) -> Optional[dict]:
        """The state of the checkpoint Ray Train restores (a retry, or a relaunch of the run)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return None
        with checkpoint.as_directory() as directory:
            return load_state(directory)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # to the device (+ DDP when W > 1)

    def report(self, metrics: dict, checkpoint_dir: Optional[str] = None) -> None:
        """``ray.train.report`` (a barrier across the workers), with the directory as a checkpoint."""
        import ray.train
        from ray.train import Checkpoint

        checkpoint = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


class InProcessWorker:
    """The loop's view of itself when it runs in the calling process (rank 0 of 1, on the CPU):
    reports persist their checkpoint to the run directory and keep the last metrics."""

    in_process = True
    rank, world = 0, 1

    def __init__(self, run_uri: str):
        self.run_uri = run_uri
        self.device = torch.device("cpu")
        self.metrics: dict = {}
        self.checkpoint: Optional[str] = None  # URI of the last persisted checkpoint

    def restored_state(self) -> Optional[dict]:
        return None  # the run's latest checkpoint comes in the loop's config ("resume_from")

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)  # what prepare_model does for one worker

    def report(self, metrics: dict, checkpoint_dir: Optional[str] = None) -> None:
        self.metrics = dict(metrics)
        if checkpoint_dir:
            self.checkpoint = persist_checkpoint(checkpoint_dir, self.run_uri, int(metrics["global_step"]))


def run_with_retries(launch: Callable[[], Any], max_failures: int, log: Callable[[str], None]) -> Any:
    """``launch()``, called again after an exception up to ``max_failures`` times (-1: no limit),
    as Ray Train's ``FailureConfig`` restarts its workers; each call resumes from the run's latest
    checkpoint. The last failure is raised."""
    failures = 0
    while True:
        try:
            return launch()
        except Exception as err:  # noqa: BLE001 (any worker error is retried, as by Ray Train)
            failures += 1
            if 0 <= max_failures < failures:
                raise
            log(f"train: in-process launch failed ({type(err).__name__}: {err}); retry {failures}"
                f"{'' if max_failures < 0 else f' of {max_failures}'} from the latest checkpoint")
