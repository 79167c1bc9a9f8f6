"""Cluster scenarios for tests/cluster, each run inside its own PID/network/mount namespace.

    scenario.py submit    --result R.json --log L.log -- JOB_ARGS...
    scenario.py autoscale --result R.json --log L.log -- JOB_ARGS...

`submit` is the README's local-head path: `ray start --head`, `ray job submit --working-dir .` of the
synthesis job, `ray stop --force`. `autoscale` starts Ray's fake multi-node autoscaling cluster
(`ray.cluster_utils.AutoscalingCluster`) with cluster/launcher.yaml's worker node types (fake GPUs,
min 0), submits the synthesis job the same way, and records when GPU nodes come and go. Both write
what they saw to the result file; the tests outside the namespace check it and the job's outputs.

Never run this outside its namespaces: `ray stop --force` and `AutoscalingCluster.start()` kill every
Ray process they can see (ray_namespace.command() gives it its own; conftest.py and
benchmarks/autoscaling.py start it that way).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
JOB_API = "http://127.0.0.1:8265"
SUBMISSION_ID = "instructrag-synthesize"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Object store of each fake node: all of them share this machine's memory.
OBJECT_STORE = 256 * 1024**2


def ray_cli(log: Path, *args: str, timeout: float = 300) -> int:
    """Run the `ray` CLI from the repository root (as the README does), output appended to `log`."""
    with log.open("a") as out:
        out.write(f"\n$ ray {shlex.join(args)}\n")
        out.flush()
        return subprocess.run(["ray", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout).returncode


def submit_job(log: Path, job_args: list[str], *, wait: bool, working_dir: bool = True) -> int:
    """`ray job submit --working-dir . -- python jobs/synthesize.py ...`, as the README has it; `python`
    is the first on PATH. Without `working_dir` the job runs the script from this checkout, whose package
    the virtualenv has installed (editable)."""
    upload = ["--working-dir", ".", "--", "python", "jobs/synthesize.py"] if working_dir else [
        "--", "python", str(REPO / "jobs" / "synthesize.py")]
    return ray_cli(log, "job", "submit", "--address", JOB_API, "--submission-id", SUBMISSION_ID,
                   *([] if wait else ["--no-wait"]), *upload, *job_args)


def job_record() -> dict:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(JOB_API)
    info = client.get_job_info(SUBMISSION_ID)
    return {"status": str(info.status.value), "message": info.message, "entrypoint": info.entrypoint,
            "start_time_ms": info.start_time, "end_time_ms": info.end_time,
            "logs": client.get_job_logs(SUBMISSION_ID)}


# --- submit -----------------------------------------------------------------------------------------


def submit(job_args: list[str], log: Path) -> dict:
    result: dict = {"scenario": "submit"}
    started = time.time()
    result["ray_start_rc"] = ray_cli(log, "start", "--head", "--num-cpus=4", "--disable-usage-stats")
    result["head_up_s"] = round(time.time() - started, 2)
    try:
        submitted = time.time()
        result["submit_rc"] = submit_job(log, job_args, wait=True)  # streams the job's logs, exits 0 on success
        result["job_wall_s"] = round(time.time() - submitted, 2)
        result["job"] = job_record()
    finally:
        result["ray_stop_rc"] = ray_cli(log, "stop", "--force")  # kills every Ray process in the namespace
    return result


# --- autoscale ---------------------------------------------------------------------------------------


def fake_cluster_config(launcher: dict, max_per_type: int) -> tuple[dict, dict]:
    """Head resources and worker node types for AutoscalingCluster, from the launcher's node types: the
    same logical resources (fake GPUs included) and min_workers, at most `max_per_type` nodes a type."""
    types = launcher["available_node_types"]
    head = {**types[launcher["head_node_type"]]["resources"], "object_store_memory": OBJECT_STORE}
    workers = {
        name: {"resources": {**t["resources"], "object_store_memory": OBJECT_STORE}, "node_config": {},
               "min_workers": t.get("min_workers", 0), "max_workers": min(t["max_workers"], max_per_type)}
        for name, t in types.items() if name != launcher["head_node_type"]
    }
    return head, workers


def autoscaling_cluster(head_resources: dict, worker_node_types: dict, **config):
    from ray.cluster_utils import AutoscalingCluster

    class FakeCluster(AutoscalingCluster):
        # Ray 2.60's wheel lacks autoscaler/_private/fake_multi_node/example.yaml, the base config that
        # AutoscalingCluster._generate_config reads; this gives it the whole config (example.yaml's
        # fields). It can go once the wheel ships the file again.
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
            return {
                "cluster_name": "fake_multinode", "max_workers": 8, "head_node_type": "ray.head.default",
                "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                             "disable_node_updaters": True, "disable_launch_config_check": True},
                "available_node_types": {**worker_node_types, "ray.head.default": {
                    "resources": head_resources, "node_config": {}, "max_workers": 0}},
                "auth": {}, "docker": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 1,
                "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
                "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
                "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
                "worker_start_ray_commands": [], **config_kwargs,
            }

    return FakeCluster(head_resources=head_resources, worker_node_types=worker_node_types, **config)


def autoscale(job_args: list[str], log: Path, *, idle_timeout_minutes: float, max_per_type: int,
              timeout_s: float) -> dict:
    import ray
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    launcher = yaml.safe_load((REPO / "cluster" / "launcher.yaml").read_text())
    head, workers = fake_cluster_config(launcher, max_per_type)
    result: dict = {"scenario": "autoscale", "head_resources": dict(head), "worker_node_types": workers,
                    "idle_timeout_minutes": idle_timeout_minutes}
    cluster = autoscaling_cluster(head, workers, idle_timeout_minutes=idle_timeout_minutes,
                                  max_workers=max_per_type * len(workers))
    started = time.time()
    cluster.start()  # runs `ray stop --force`, then `ray start --head` with the fake provider (own namespace)
    result["head_up_s"] = round(time.time() - started, 2)
    ray.init(address="auto", log_to_driver=False)
    try:
        resources: dict = {}  # node id -> its resources, kept after the node is gone
        result["worker_nodes_before"] = len(worker_nodes(resources))
        t0 = time.time()
        # No --working-dir here: the fake nodes share one machine and so one runtime_resources directory
        # (/tmp/ray/session_*/runtime_resources); a node's runtime-env agent setting up or releasing
        # the working_dir package pulls it from under the other nodes' workers (their cwd vanishes).
        # Real nodes each have their own disk; tests/cluster/test_job_submit.py covers --working-dir.
        result["submit_rc"] = submit_job(log, job_args, wait=False, working_dir=False)
        client = JobSubmissionClient(JOB_API)
        timeline: list[dict] = []
        status = "PENDING"
        while time.time() - t0 < timeout_s:
            nodes = worker_nodes(resources)
            gpu_nodes = sum(bool(n["Resources"].get("GPU")) for n in nodes)
            gpus_busy = ray.cluster_resources().get("GPU", 0) - ray.available_resources().get("GPU", 0)
            # actors waiting for a GPU, which no node has before the autoscaler adds one
            pending = sum(bool((a.required_resources or {}).get("GPU")) for a in list_actors(
                filters=[("state", "=", "PENDING_CREATION")], detail=True, limit=100, raise_on_missing_output=False))
            if status not in TERMINAL:
                status = str(client.get_job_status(SUBMISSION_ID).value)
                if status in TERMINAL:
                    result["actors"] = actor_placement(list_actors, resources)
            state = {"gpu_nodes": gpu_nodes, "cpu_nodes": len(nodes) - gpu_nodes, "gpus_busy": gpus_busy,
                     "gpu_actors_pending": pending, "job": status}
            if not timeline or {k: timeline[-1][k] for k in state} != state:
                timeline.append({"t": round(time.time() - t0, 2), **state})
            if status in TERMINAL and not nodes:
                break
            time.sleep(0.5)
        result["timeline"] = timeline
        result["job"] = job_record() if status in TERMINAL else {"status": status}
        result.update(scaling_times(timeline))
    finally:
        ray.shutdown()
        result["ray_stop_rc"] = ray_cli(log, "stop", "--force")
    return result


def worker_nodes(resources: dict) -> list[dict]:
    """The live worker nodes; records every node's resources in `resources`."""
    import ray

    alive = [n for n in ray.nodes() if n["Alive"]]
    resources.update({n["NodeID"]: n["Resources"] for n in alive})
    return [n for n in alive if "node:__internal_head__" not in n["Resources"]]


def actor_placement(list_actors, resources: dict) -> list[dict]:
    """Where each of the job's actors ran: Ray Data's name for it and its node's resources."""
    return [{"class_name": a.class_name, "state": a.state, "node_id": a.node_id,
             "node_gpus": resources.get(a.node_id, {}).get("GPU", 0),
             "node_labels": sorted(k for k in resources.get(a.node_id, {}) if k.endswith("_worker"))}
            for a in list_actors(detail=True, limit=1000, raise_on_missing_output=False)]


def scaling_times(timeline: list[dict]) -> dict:
    """Seconds (t: from the submission). Scale-up: from the first actor waiting for a GPU to the first
    GPU node, and to the most GPU nodes. Scale-down: from the GPUs' last use (the generation
    actors gone) to no GPU node left."""
    peak = max((e["gpu_nodes"] for e in timeline), default=0)
    demand = next((e["t"] for e in timeline if e["gpu_actors_pending"]), None)
    first_up = next((e["t"] for e in timeline if e["gpu_nodes"] > 0), None)
    all_up = next((e["t"] for e in timeline if peak and e["gpu_nodes"] == peak), None)
    job_end = next((e["t"] for e in timeline if e["job"] in TERMINAL), None)
    last_busy = max((i for i, e in enumerate(timeline) if e["gpus_busy"] > 0), default=None)
    idle_from = timeline[last_busy + 1]["t"] if last_busy is not None and last_busy + 1 < len(timeline) else None
    down = next((e["t"] for e in timeline[(last_busy or 0):] if e["gpu_nodes"] == 0), None) if idle_from else None

    def since(t):
        return round(t - demand, 2) if t is not None and demand is not None else None

    return {"peak_gpu_nodes": peak, "demand_t": demand, "first_gpu_node_t": first_up, "job_end_t": job_end,
            "gpus_idle_t": idle_from, "scale_up_first_s": since(first_up), "scale_up_all_s": since(all_up),
            "scale_down_s": round(down - idle_from, 2) if down is not None else None}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=["submit", "autoscale"])
    parser.add_argument("--result", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--idle-timeout-minutes", type=float, default=0.1)
    parser.add_argument("--max-per-type", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=300)
    own, job_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = parser.parse_args(own)
    log = Path(args.log)
    if args.scenario == "submit":
        result = submit(job_args, log)
    else:
        result = autoscale(job_args, log, idle_timeout_minutes=args.idle_timeout_minutes,
                           max_per_type=args.max_per_type, timeout_s=args.timeout_s)
    Path(args.result).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
