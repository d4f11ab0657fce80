"""Multi-node training on one machine: Ray Train workers on two nodes, one node lost mid-training.

The scenario (``tests/multinode_job.py``) runs in a subprocess: a ``ray.cluster_utils.Cluster``
needs a Ray instance of its own, apart from the session's ``ray_local``. Its head node holds the
driver, the Ray Train controller and every Ray Data task; two worker nodes offer one
``trainer_slot`` each and no CPU, and ``train.resources_per_worker = {CPU: 0, trainer_slot: 1}``,
so a 2-worker group can only be one worker per worker node. Training is elastic
(``train.num_workers=1, train.max_workers=2``) and writes through a ``file://`` URI. After the
2-worker group's third step (a checkpoint at every step), the node of rank 0 (the rank that
writes checkpoints) is removed; Ray Train restarts one worker on the surviving node from the
latest checkpoint and the run must end with every global step exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from pacl_ray.formats import storage

pytestmark = pytest.mark.timeout(720)  # starts three Ray nodes; a loaded 2-core machine is slow

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multinode_job.py")
GATE_STEP = 3  # multinode_job.GATE_STEP


def _run_job(workdir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    # Ray's temp dir (sockets, logs, and the "current cluster" address file that an address-less
    # ray.init() would join) goes to a short private directory (Unix socket paths are limited).
    ray_tmp = tempfile.mkdtemp(prefix="pacl-mn-", dir="/tmp")
    env.update(RAY_TMPDIR=ray_tmp, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", RAY_DEDUP_LOGS="0",
               # The controller takes one report per health check: poll every 0.5 s, not 2 s.
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5")
    log = os.path.join(workdir, "job.log")
    try:
        with open(log, "w") as handle:
            proc = subprocess.run([sys.executable, JOB, workdir], stdout=subprocess.PIPE, stderr=handle,
                                  env=env, text=True, timeout=660)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    tail = open(log).read()[-6000:]
    assert proc.returncode == 0 and lines, f"job exited {proc.returncode}; stderr tail:\n{tail}"
    result = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in result, f"{result['error']}\nstderr tail:\n{tail}"
    return result


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("multinode"))
    start = time.monotonic()
    result = _run_job(workdir)
    result["wall_s"] = time.monotonic() - start
    return result


def _events(job, kind, after=-1):
    """The ``kind`` events recorded after position ``after`` of the (ordered) event log."""
    return [(i, e) for i, e in enumerate(job["events"]) if e["event"] == kind and i > after]


def _gate(job) -> int:
    gates = _events(job, "gate")
    assert len(gates) == 1, f"the node was not removed mid-training: {job['events']}"
    assert gates[0][1]["step"] == GATE_STEP
    return gates[0][0]


def test_workers_run_on_two_worker_nodes(job):
    first = _events(job, "group")[0][1]["workers"]
    assert [rank for rank, _ in first] == [0, 1]
    nodes = [node for _, node in first]
    assert len(set(nodes)) == 2 and set(nodes) == set(job["worker_nodes"])  # one per worker node
    assert job["head_node"] not in nodes
    # The two ranks trained together, as one 2-worker group, until the node was lost.
    gate = _gate(job)
    before = [e for i, e in _events(job, "report") if i < gate]
    assert [e["step"] for e in before] == list(range(1, GATE_STEP + 1))
    assert all(e["world"] == 2 and e["steps"] == [e["step"]] for e in before)


def test_lost_node_restarts_on_the_remaining_one(job):
    assert "remove_error" not in job, job["remove_error"]
    gate = _gate(job)
    first = dict(_events(job, "group")[0][1]["workers"])
    assert job["removed_node"] == first[0]  # the node of rank 0 (the checkpoint writer) went
    survivor = first[1]

    # Ray Train saw the worker on the lost node fail, then started one worker on what remains.
    assert _events(job, "exception", after=gate)
    after = _events(job, "group", after=gate)
    assert after, "no worker group started after the node was removed"
    last, group = after[-1]
    assert group["workers"] == [[0, survivor]]
    assert all(job["removed_node"] not in dict(g["workers"]).values() for _, g in after)

    # It resumed from a checkpoint of the 2-worker group (not from scratch) and finished alone.
    resumed = [e for _, e in _events(job, "report", after=last)]
    assert resumed and all(e["world"] == 1 for e in resumed)
    checkpointed = {e["step"] for _, e in _events(job, "report") if e["checkpoint"] and e["world"] == 2}
    assert resumed[0]["step"] - 1 in checkpointed and resumed[0]["step"] - 1 >= 2
    assert resumed[-1]["step"] == job["expected_total"]


def test_exact_step_count_after_the_loss(job):
    total = job["expected_total"]
    assert total == 8
    assert job["counters"]["global_step"] == total
    assert job["step_rows_steps"] == list(range(total))  # every global step once: none lost or repeated
    assert job["final_metrics"]["total_steps"] == total


def test_storage_through_a_file_uri(job):
    assert job["output_dir"].startswith("file://")
    assert job["run_uri"].startswith(job["output_dir"] + "/stages/train/")
    assert job["success"] and job["metrics_steps_csv"]
    assert storage.exists(storage.join(job["run_uri"], "export", "backbone.safetensors"))
    assert os.path.exists(os.path.join(job["checkpoint"], "state.pt"))
