"""The multi-node scenario of ``tests/test_multinode.py``, run in a process of its own.

    python tests/multinode_job.py WORKDIR

A ``ray.cluster_utils.Cluster`` on this machine: a head node (the driver, the Ray Train controller
and every Ray Data task) and two worker nodes that offer no CPU to Ray, only one ``trainer_slot``
each, so each holds exactly one Ray Train worker and nothing else. ``run_train`` trains elastically
(``train.num_workers=1, train.max_workers=2``) with ``output_dir`` a ``file://`` URI.

Every step reports a checkpoint (Ray Train V2 reports are checkpoints). When the 2-worker group
has reported global step ``GATE_STEP``, a Ray Train callback holds the controller until the driver has removed the node of rank 0;
while it is held the workers can run at most two reports ahead (Ray Train's result queue holds
one report), so the node always goes mid-training. Ray Train then restarts on what remains (one
worker on the surviving node) from the latest checkpoint.

What happened is recorded by a public ``UserCallback`` that runs in the controller (each worker
group's ranks and nodes, from the reports; every report with its world size and global step;
worker exceptions) in an events file, and printed with the final state as one line ``RESULT {json}`` on stdout.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from ray.train import UserCallback  # noqa: E402

GATE_STEP = 3  # remove a node once the 2-worker group has done 3 steps (checkpointed at 1, 2 and 3)
GATE_TIMEOUT_S = 300.0


def append_event(path: str, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps({**record, "t": time.time()}) + "\n")


def read_events(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    events = []
    for line in open(path).read().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:  # a line still being written
            pass
    return events


class ReportRecorder(UserCallback):
    """Controller side (public ``UserCallback``): every report (world size, global step,
    checkpoint or not), each worker group's ranks and nodes (a "group" event before the first
    report of a group that differs from the last; every report carries its rank's ``world_rank``
    and ``node_id``), worker exceptions, and the gate that holds the controller while the driver
    removes a node."""

    def __init__(self, events: str, release: str):
        self.events, self.release, self.gated, self.group = events, release, False, None

    def after_report(self, run_context, metrics, checkpoint) -> None:
        step = int(metrics[0]["global_step"])
        workers = sorted([int(m["world_rank"]), m["node_id"]] for m in metrics)
        if workers != self.group:
            self.group = workers
            append_event(self.events, {"event": "group", "workers": workers})
        append_event(self.events, {"event": "report", "world": len(metrics), "step": step,
                                   "steps": sorted({int(m["global_step"]) for m in metrics}),
                                   "checkpoint": checkpoint is not None})
        if not self.gated and len(metrics) == 2 and step >= GATE_STEP:
            self.gated = True
            append_event(self.events, {"event": "gate", "step": step})
            deadline = time.monotonic() + GATE_TIMEOUT_S
            while not os.path.exists(self.release) and time.monotonic() < deadline:
                time.sleep(0.05)

    def after_exception(self, run_context, worker_exceptions) -> None:
        append_event(self.events, {"event": "exception",
                                   "ranks": {str(r): repr(e)[:300] for r, e in worker_exceptions.items()}})


def _forget_node(node_id: str, timeout_s: float = 60.0) -> None:
    """Wait until the GCS reports ``node_id`` dead, then make Ray's AutoscalingCoordinator (which
    elastic Ray Train asks how many workers fit) re-read the cluster now rather than at its next
    20 s tick: otherwise the restart first tries 2 workers and waits out the worker group start
    timeout (60 s) before trying 1. Only saves time; the run recovers either way."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
        time.sleep(0.1)
    try:
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
        ray.get(coordinator.get_reserved_resources.remote("pacl-multinode-test", recompute=True), timeout=30)
    except Exception:  # an internal API: without it the restart is only slower
        traceback.print_exc()


def main(workdir: str) -> dict:
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster

    from pacl_ray import config
    from pacl_ray.formats import storage
    from pacl_ray.stages.train import load_state, run_train
    from pacl_ray.stages.train_data import epoch_phases, steps_per_epoch
    from test_train import CODES, TINY, write_stage_tables

    events, release = os.path.join(workdir, "events.jsonl"), os.path.join(workdir, "node-removed")
    tables = write_stage_tables(Path(workdir) / "world")
    output_dir = "file://" + os.path.join(workdir, "out")
    cfg = config.from_dict({
        "output_dir": output_dir, "seed": 3,
        "model": {"backbone": TINY, "backbone_pretrained": "false", "embed_dim": 16},
        "train": {"epochs": 3, "global_batch_size": 8, "image_size": 32, "lr_backbone": 1e-3,
                  "checkpoint_every_steps": 1, "log_every_steps": 1, "num_workers": 1, "max_workers": 2,
                  "max_failures": 2, "resources_per_worker": {"CPU": 0, "trainer_slot": 1}},
    })
    expected_total = sum(steps_per_epoch(np.asarray(CODES), epoch_phases(cfg), cfg.train.global_batch_size))

    # Logical CPUs are oversubscribed as in tests/conftest.py: the two workers' Ray Data pipelines
    # run on the head at once (with 4, one of them stalls for ~30 s).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 8, "num_gpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=0, num_gpus=0, resources={"trainer_slot": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, configure_logging=False)
    out: dict = {"head_node": cluster.head_node.node_id, "worker_nodes": [n.node_id for n in workers],
                 "expected_total": expected_total, "output_dir": output_dir}

    def remove_rank0_node() -> None:
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while not any(e["event"] == "gate" for e in read_events(events)):
            if done.is_set() or time.monotonic() > deadline:
                return
            time.sleep(0.1)
        try:
            group = [e for e in read_events(events) if e["event"] == "group"][-1]
            node_id = dict(group["workers"])[0]
            node = next(n for n in workers if n.node_id == node_id)
            cluster.remove_node(node)
            out["removed_node"] = node_id
            out["removed_at"] = time.time()
            _forget_node(node_id)
        except Exception:
            out["remove_error"] = traceback.format_exc()
        finally:
            open(release, "w").close()

    done = threading.Event()
    remover = threading.Thread(target=remove_rank0_node, daemon=True)
    remover.start()
    try:
        result = run_train(cfg, tables["ingest"], tables["partition"], tables["embed"], tables["cluster"],
                           callbacks=[ReportRecorder(events, release)])
        state = load_state(result.checkpoint)
        out.update(
            run_uri=result.uri, checkpoint=result.checkpoint, counters=state["counters"],
            step_rows_steps=[int(r["global_step"]) for r in state["step_rows"]],
            final_metrics={k: v for k, v in result.final_metrics.items() if isinstance(v, (int, float, str))},
            metrics_steps_csv=storage.exists(storage.join(result.uri, "metrics_steps.csv")),
            success=storage.exists(storage.join(result.uri, "_SUCCESS")),
        )
    except Exception:
        out["error"] = traceback.format_exc()
    done.set()
    remover.join(timeout=30)
    out["events"] = read_events(events)
    ray.shutdown()
    cluster.shutdown()
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1]), default=str), flush=True)
