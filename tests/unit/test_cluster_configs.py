"""cluster/: KubeRay manifests, the cluster-launcher config, the Dockerfile and the local scripts' input checks.

No Kubernetes or cloud runs here, so the manifests are checked structurally: a JSON schema written from
the KubeRay ray.io/v1 API reference (required fields and types of RayCluster/RayJob), plus the properties
rnb-ray relies on. The launcher config is validated with Ray's own schema and defaults (the code `ray up`
runs first).
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
VERSION = version("rnb-ray")

# --- KubeRay -----------------------------------------------------------------------------------------

_RESOURCES = {
    "type": "object",
    "properties": {"limits": {"type": "object"}, "requests": {"type": "object"}},
    "additionalProperties": False,
}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "image": {"type": "string", "minLength": 1},
        "resources": _RESOURCES,
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}},
        "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"]}},
        "env": {"type": "array", "items": {"type": "object", "required": ["name"]}},
    },
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
            },
        }
    },
}
_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}  # map[string]string
_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string"},
        "authOptions": {"type": "object", "properties": {"mode": {"enum": ["disabled", "token"]}}},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                "resources": _RESOURCES,
                "image": {"type": "string"},
                "env": {"type": "array"},
            },
        },
        "headGroupSpec": {
            "type": "object",
            "required": ["rayStartParams", "template"],
            "additionalProperties": False,
            "properties": {
                "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "rayStartParams": _START_PARAMS,
                "template": _POD_TEMPLATE,
            },
        },
        "workerGroupSpecs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
                "additionalProperties": False,
                "properties": {
                    "groupName": {"type": "string", "minLength": 1},
                    "replicas": {"type": "integer", "minimum": 0},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 0},
                    "rayStartParams": _START_PARAMS,
                    "template": _POD_TEMPLATE,
                },
            },
        },
    },
}
_METADATA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
RAYCLUSTER_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayCluster"},
                   "metadata": _METADATA, "spec": _CLUSTER_SPEC},
}
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "required": ["entrypoint", "rayClusterSpec"],
            "additionalProperties": False,
            "properties": {
                "entrypoint": {"type": "string", "minLength": 1},
                "runtimeEnvYAML": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "rayClusterSpec": _CLUSTER_SPEC,
            },
        },
    },
}


def _load(name: str) -> dict:
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()))
    assert len(docs) == 1
    return docs[0]


@pytest.fixture(params=["raycluster.yaml", "rayjob.yaml"])
def cluster_spec(request) -> dict:
    doc = _load(request.param)
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _pods(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, g["template"]["spec"]) for name, g in groups]


def test_manifests_match_the_kuberay_schema():
    jsonschema.validate(_load("raycluster.yaml"), RAYCLUSTER_SCHEMA)
    jsonschema.validate(_load("rayjob.yaml"), RAYJOB_SCHEMA)


def test_schema_rejects_a_broken_manifest():
    """The schema is strict enough to catch the usual slips (a misspelt field, a missing one)."""
    doc = _load("raycluster.yaml")
    for breakage in (
        lambda d: d["spec"]["workerGroupSpecs"][0].pop("maxReplicas"),
        lambda d: d["spec"]["headGroupSpec"].__setitem__("rayStartParam", {}),
        lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0),
        lambda d: d.__setitem__("apiVersion", "ray.io/v1alpha1"),
    ):
        broken = copy.deepcopy(doc)
        breakage(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, RAYCLUSTER_SCHEMA)


def test_token_auth_and_a_private_dashboard(cluster_spec):
    assert cluster_spec["authOptions"]["mode"] == "token"
    assert cluster_spec.get("headGroupSpec", {}).get("serviceType", "ClusterIP") == "ClusterIP"


def test_ray_version_matches_the_tested_ray(cluster_spec):
    assert cluster_spec["rayVersion"] == ray.__version__


def test_cpu_and_gpu_groups_autoscale_within_bounds(cluster_spec):
    assert cluster_spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster_spec["workerGroupSpecs"]}
    assert {"cpu", "gpu"} <= set(groups)
    for g in groups.values():
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]
        assert g["maxReplicas"] >= 1
    assert groups["gpu"]["minReplicas"] == 0  # GPUs only while work needs them


def test_images_and_resources(cluster_spec):
    for name, pod in _pods(cluster_spec):
        (container,) = pod["containers"]
        image = container["image"]
        flavour = "gpu" if name == "gpu" else "cpu"
        assert image.endswith(f"rnb-ray:{VERSION}-{flavour}"), (name, image)
        res = container["resources"]
        assert res["limits"] == res["requests"], f"{name}: Ray wants requests == limits"
        assert {"cpu", "memory"} <= set(res["limits"])
        assert ("nvidia.com/gpu" in res["limits"]) == (name == "gpu")


def test_head_takes_no_work_and_every_pod_sees_the_same_data(cluster_spec):
    assert cluster_spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    claims = set()
    for _, pod in _pods(cluster_spec):
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "/dev/shm" in mounts and "/data" in mounts
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        claims.add(volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"])
    assert len(claims) == 1


def test_rayjob_runs_the_pipeline_from_the_image():
    spec = _load("rayjob.yaml")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python"
    script = Path(argv[1])
    # The Dockerfile puts jobs/ under /home/ray/rnb-ray; the entrypoint must point there.
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"COPY .*jobs {re.escape(str(script.parent))}\n", dockerfile)
    assert script.name == "pipeline.py"
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert all(a.startswith("/data/") for a in argv[argv.index("--input") + 1:argv.index("--input") + 2])
    assert argv[argv.index("--output") + 1].startswith("/data/")


def test_rayjob_entrypoint_flags_parse_with_the_job():
    """The entrypoint's flags are accepted by the pipeline job's own argument parser."""
    job = REPO / "jobs" / "pipeline.py"
    argv = shlex.split(_load("rayjob.yaml")["spec"]["entrypoint"])
    command = re.search(r'main\(\[\s*"([\w-]+)"', job.read_text())
    assert command, "jobs/pipeline.py does not call rnb_ray.cli.main([<command>, ...])"
    from rnb_ray.cli import build_parser

    args = build_parser().parse_args([command.group(1), *argv[2:]])
    assert args.handler is not None
    # Values are coerced by the config machinery (which also checks that --input exists, so not here).
    assert args.input == "/data/corpus" and args.k == "8,16,32" and args.output.startswith("/data/")


def test_dockerfile_installs_torch_then_the_package():
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-py311-cpu" in text
    torch_at, pkg_at = text.index('pip install --no-cache-dir "torch=='), text.index("pip install --no-cache-dir /home")
    assert torch_at < pkg_at
    assert "ENV HF_HUB_OFFLINE=1" in text


# --- cluster launcher --------------------------------------------------------------------------------


def _launcher() -> dict:
    return yaml.safe_load((CLUSTER / "launcher" / "aws.yaml").read_text())


def test_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(_launcher()))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    broken = copy.deepcopy(_launcher())
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 0  # misspelt
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_launcher_installs_torch_for_the_node_and_rnb_ray():
    cfg = _launcher()
    setup = "\n".join(cfg["setup_commands"])
    assert "download.pytorch.org/whl/cpu" in setup and "download.pytorch.org/whl/cu" in setup
    assert "nvidia-smi" in setup
    assert "pip install -q ~/rnb-ray" in setup
    assert cfg["file_mounts"]["~/rnb-ray"] == "."
    types = cfg["available_node_types"]
    assert types["gpu_worker"]["docker"]["worker_image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert cfg["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-cpu"
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}


def test_launcher_keeps_token_auth_and_a_local_dashboard():
    cfg = _launcher()
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    head = " ".join(cfg["head_start_ray_commands"])
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head
    assert "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token ray start --address" in workers


# --- local scripts (argument checks only; the cluster itself is tested in tests/integration) --------


def _script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "RNB_CLUSTER_DIR": "/tmp/rnbc-unit-never-started", **env}
    return subprocess.run([str(CLUSTER / "local" / name), *args], capture_output=True, text=True,
                          env=full_env, timeout=60)


@pytest.mark.parametrize("name", ["common.sh", "start.sh", "stop.sh", "status.sh"])
def test_scripts_parse(name):
    assert subprocess.run(["bash", "-n", str(CLUSTER / "local" / name)]).returncode == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "two"], "--workers 'two' is not a whole number"),
        (["--worker-cpus", "1,x"], "--worker-cpus '1,x' must be N or N,N,..."),
        (["--object-store-mb", "10"], "must be a whole number >= 80"),
        (["--bogus"], "unknown argument '--bogus'"),
    ],
)
def test_start_rejects_bad_arguments_before_starting_anything(args, message):
    out = _script("start.sh", *args)
    assert out.returncode == 2
    assert message in out.stderr
    assert not Path("/tmp/rnbc-unit-never-started").exists()


def test_scripts_reject_a_bad_port_setting():
    out = _script("start.sh", RNB_GCS_PORT="63 79")
    assert out.returncode == 1
    assert "RNB_GCS_PORT=63 79 is not a port number" in out.stderr


def test_stop_and_status_of_a_cluster_that_never_ran():
    assert "is not running" in _script("stop.sh").stdout
    assert _script("status.sh").returncode == 1
