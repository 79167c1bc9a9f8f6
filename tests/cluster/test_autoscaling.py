"""Autoscaling on Ray's fake multi-node cluster (`ray.cluster_utils.AutoscalingCluster`) with the worker
node types of cluster/launcher.yaml (fake GPUs, min 0): the synthesis job's GPU actor pool makes the
autoscaler launch GPU worker nodes, the job completes on them, and they scale back down to zero."""

import json

import pytest

pytestmark = pytest.mark.integration

ROWS = 12
GEN_ACTORS, GPUS_EACH = 2, 0.75  # fractional GPUs on 1-GPU nodes: two actors need two GPU nodes


def test_gpu_workers_scale_up_for_the_job_and_back_down(run_scenario, outside_ray, tiny_model, world, index,
                                                        tmp_path):
    out = tmp_path / "synthesis"
    result = run_scenario("autoscale", [
        "--input", str(world["qa"]), "--output", str(out), f"retrieval.index_path={index}", f"limit={ROWS}",
        "generation.max_new_tokens=8", "generation.batch_size=4", "progress_interval_s=0",
        # fractional fake GPUs plus the node type's label; no real GPU, so each actor runs on CPU
        f"generation.num_gpus={GPUS_EACH}", f"generation.resources=gpu_worker:{GPUS_EACH}", "generation.num_cpus=0.5",
        f"generation.min_actors={GEN_ACTORS}", f"generation.max_actors={GEN_ACTORS}",
    ], 420, "--idle-timeout-minutes", "0.1", "--max-per-type", "2", "--timeout-s", "300")

    job = result["job"]
    assert result["worker_nodes_before"] == 0, "min_workers is 0: no worker node before the job"
    assert job["status"] == "SUCCEEDED", job.get("message", "") + "\n" + job.get("logs", "")[-4000:]
    assert result["peak_gpu_nodes"] == 2, result["timeline"]
    assert result["timeline"][-1]["gpu_nodes"] == 0, f"the GPU nodes did not scale back down: {result['timeline']}"
    assert result["scale_up_first_s"] is not None and result["scale_down_s"] is not None, result["timeline"]

    generation = [a for a in result["actors"] if "GenerateStage" in a["class_name"]]
    assert len(generation) == GEN_ACTORS, result["actors"]
    assert all(a["node_gpus"] >= 1 and a["node_labels"] == ["gpu_worker"] for a in generation), generation
    retrieval = [a for a in result["actors"] if "RetrieveStage" in a["class_name"]]
    assert retrieval and all(a["node_gpus"] == 0 for a in retrieval), "retrieval should not take a GPU node"

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input_rows"] == ROWS
    assert manifest["totals"]["rationales"] + manifest["totals"]["rejected"] == ROWS
    assert manifest["totals"]["rationales"] > 0
    print(f"\nscale-up: first GPU node {result['scale_up_first_s']}s, both {result['scale_up_all_s']}s after the "
          f"actors asked for GPUs; scale-down: no GPU node {result['scale_down_s']}s after the GPUs fell idle "
          f"(idle timeout 6s); job done {result['job_end_t']}s after submission")
    outside_ray.check()
