"""cluster/: the launcher YAML against Ray's own autoscaler schema, the KubeRay manifests against what a
RayCluster and a RayJob need, and every Ray version pin, image tag, dependency list and job command line
in them against pyproject.toml and the jobs' configs."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from instructrag_ray.config import JOB_CONFIGS, load_config, parse_resources
from instructrag_ray.retrieval.elastic.client import ENV_API_KEY, ENV_PASSWORD, ENV_USERNAME

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
PYPROJECT = (ROOT / "pyproject.toml").read_text()
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
ELASTIC_CREDENTIALS = (ENV_API_KEY, ENV_USERNAME, ENV_PASSWORD)  # the variables the Elasticsearch client reads


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def pinned_ray_version() -> str:
    # every ray pin (dependencies and extras such as vllm's ray[llm]) must name the same version
    found = set(re.findall(r'"ray\[[^\]]*\]==([0-9][0-9.]*)"', PYPROJECT))
    assert len(found) == 1, "pyproject.toml must pin ray to one version, as ray[...]==X.Y.Z"
    return found.pop()


def pyproject_list(name: str) -> list[str]:
    block = re.search(rf"^{name} = \[(.*?)^\]", PYPROJECT, re.S | re.M).group(1)
    return re.findall(r'"([^"]+)"', block)


def project_version() -> str:
    return re.search(r'^version = "([^"]+)"', PYPROJECT, re.M).group(1)


def assert_ray_image(image: str, gpu: bool) -> None:
    """rayproject/ray:<pinned>-py3XX, with -gpu exactly on GPU nodes."""
    match = re.fullmatch(r"rayproject/ray:(?P<version>[0-9.]+)-py3\d+(?P<gpu>-gpu)?", image)
    assert match, f"{image}: not a rayproject/ray:<version>-py3XX[-gpu] tag"
    assert match["version"] == pinned_ray_version(), f"{image}: pyproject.toml pins Ray {pinned_ray_version()}"
    assert bool(match["gpu"]) == gpu, f"{image}: {'GPU nodes need the -gpu' if gpu else 'CPU nodes take the CPU'} image"


def test_the_installed_ray_is_the_pinned_one():
    assert ray.__version__ == pinned_ray_version()


# --- the cluster launcher ---------------------------------------------------------------------------


def test_launcher_yaml_validates_against_rays_autoscaler_schema():
    config = load("launcher.yaml")
    schema = json.loads(RAY_SCHEMA.read_text())
    jsonschema.validate(config, schema)
    # the schema is strict: a misspelt field does not pass
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(broken, schema)


def test_launcher_yaml_passes_rays_own_config_checks_after_defaults():
    # what `ray up` does before launching: merge the provider's defaults, then validate
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load("launcher.yaml")))


def test_launcher_node_types_scale_from_zero_with_gpu_and_cpu_workers():
    config = load("launcher.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not head["resources"].get("GPU"), "the head is a CPU node"
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu = {name: t for name, t in workers.items() if t["resources"].get("GPU")}
    cpu = {name: t for name, t in workers.items() if not t["resources"].get("GPU")}
    assert gpu and cpu, "one worker type for retrieval (CPU) and one for generation and training (GPU)"
    for name, t in workers.items():
        assert t.get("min_workers", 0) == 0 and t["max_workers"] >= 1, f"{name} must scale from 0 to a max"
        assert t["resources"].get(name) == t["resources"]["GPU" if name in gpu else "CPU"], (
            f"{name} declares its own label resource, one unit per {'GPU' if name in gpu else 'CPU'}")
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0

    docker = config["docker"]
    assert_ray_image(docker["image"], gpu=False)
    for name, t in workers.items():
        assert_ray_image(t.get("docker", {}).get("worker_image", docker["image"]), gpu=name in gpu)


# --- KubeRay -----------------------------------------------------------------------------------------


def ray_start_resources(group: dict) -> dict:
    """rayStartParams.resources is a JSON object written as a quoted string: '"{\\"name\\": 1}"'."""
    text = group.get("rayStartParams", {}).get("resources")
    return json.loads(text.strip().strip('"').replace('\\"', '"')) if text else {}


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def test_raycluster_autoscales_gpu_and_cpu_worker_groups_from_zero():
    cluster = load("kuberay/raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    assert spec["rayVersion"] == pinned_ray_version()
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert_ray_image(containers(spec["headGroupSpec"])[0]["image"], gpu=False)

    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    kinds = set()
    for name, g in groups.items():
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1 and 0 <= g.get("replicas", 0) <= g["maxReplicas"], name
        limits = containers(g)[0]["resources"]["limits"]
        gpus = int(limits.get("nvidia.com/gpu", 0))
        assert_ray_image(containers(g)[0]["image"], gpu=bool(gpus))
        label = "gpu_worker" if gpus else "cpu_worker"
        assert ray_start_resources(g) == {label: gpus or int(limits["cpu"])}, f"{name}: rayStartParams.resources"
        kinds.add(label)
    assert kinds == {"gpu_worker", "cpu_worker"}


def test_every_ray_container_gets_elasticsearch_settings_from_a_secret_and_a_node_local_cache():
    """Object storage is the default (no shared volume): each pod keeps its per-node copies of the index and
    models on an emptyDir at INSTRUCTRAG_CACHE; the shared volume stays an option (storage.yaml)."""
    spec = load("kuberay/raycluster.yaml")["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        for c in containers(group):
            env = {e["name"]: e for e in c["env"]}
            for name in ("ES_URL", *ELASTIC_CREDENTIALS):
                ref = env[name]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "instructrag-elasticsearch" and ref["key"], (c["name"], name)
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            cache = env["INSTRUCTRAG_CACHE"]["value"]
            assert "emptyDir" in volumes[mounts[cache]], (c["name"], cache)
            assert "/data" not in mounts, "the shared volume is the optional route, not the default"
    assert "ReadWriteMany" in load("kuberay/storage.yaml")["spec"]["accessModes"]


def test_rayjob_has_what_kuberay_needs_and_the_same_cluster():
    job = load("kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].strip()
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), "a RayJob needs a cluster spec or a selector"
    assert spec["rayClusterSpec"] == load("kuberay/raycluster.yaml")["spec"], \
        "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml's spec"
    assert spec["shutdownAfterJobFinishes"] is True


def test_runtime_environments_install_exactly_the_projects_dependencies():
    dependencies = pyproject_list("dependencies")
    extras = set(re.findall(r'"([^"]+)"', re.search(r"\[project.optional-dependencies\](.*?)(^\[|\Z)", PYPROJECT,
                                                    re.S | re.M).group(1)))
    env = load("runtime-env.yaml")
    job_env = yaml.safe_load(load("kuberay/rayjob.yaml")["spec"]["runtimeEnvYAML"])
    for runtime_env in (env, job_env):
        packages = runtime_env["pip"]["packages"]
        assert set(dependencies) <= set(packages), f"missing: {set(dependencies) - set(packages)}"
        unknown = set(packages) - set(dependencies) - extras
        assert not unknown, f"not in pyproject.toml: {unknown}"
    assert {k: v for k, v in job_env.items() if k != "working_dir"} == env
    # the job's code: this project's release archive, for the version pyproject.toml declares
    working_dir = job_env["working_dir"]
    assert re.fullmatch(rf"https://\S+/v?{re.escape(project_version())}\.zip", working_dir), working_dir


def entrypoint_commands(entrypoint: str) -> list[tuple[str, list[str]]]:
    """'python jobs/a.py ARGS && python jobs/b.py ARGS' -> [('jobs/a.py', ARGS), ('jobs/b.py', ARGS)]."""
    commands = []
    for part in entrypoint.split("&&"):
        python, script, *args = shlex.split(part)
        assert python == "python", part
        commands.append((script, args))
    return commands


def job_config(script: str, args: list[str]):
    """The job's validated config from its command line (--input/--output shorthands, key=value)."""
    overrides, rest = [], iter(args)
    for arg in rest:
        if arg in ("--input", "--output"):
            overrides.append(f"{arg[2:]}={next(rest)}")
        else:
            assert not arg.startswith("--"), f"{script}: unexpected flag {arg}"
            overrides.append(arg)
    return load_config(JOB_CONFIGS[script], None, overrides)


def test_rayjob_runs_synthesis_then_training_on_resources_the_cluster_declares():
    job = load("kuberay/rayjob.yaml")["spec"]
    commands = entrypoint_commands(job["entrypoint"])
    assert [script for script, _ in commands] == ["jobs/synthesize.py", "jobs/train.py"]
    for script, _ in commands:
        assert (ROOT / script).exists() and script in JOB_CONFIGS, f"{script}: no such job"
    synth, train = (job_config(script, args) for script, args in commands)
    assert train.input == synth.output, "training reads what synthesis wrote"

    declared = {}
    for g in job["rayClusterSpec"]["workerGroupSpecs"]:
        declared.update(ray_start_resources(g))
    # generation and training ask for GPUs (generation may take a fraction) and the GPU nodes' label;
    # retrieval asks only for CPUs
    assert synth.generation.num_gpus > 0 and synth.retrieval.num_cpus > 0
    assert train.scaling.use_gpu
    for spec in (synth.generation.resources, train.scaling.resources, synth.retrieval.resources):
        for name, amount in parse_resources(spec).items():
            assert name in declared and amount <= declared[name], f"{name}:{amount} is not on any worker group"
    assert parse_resources(synth.generation.resources) and parse_resources(train.scaling.resources)
    assert synth.generation.max_actors <= sum(g["maxReplicas"] for g in job["rayClusterSpec"]["workerGroupSpecs"]
                                              if ray_start_resources(g).get("gpu_worker"))

