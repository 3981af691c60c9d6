"""The deployment configs users run as is: cluster.yaml (`ray up`) and kuberay/rayjob.yaml.

cluster.yaml goes through the same offline steps `ray up` takes before it talks to AWS
(`prepare_config`: merge with the AWS defaults, then `validate_config`: Ray's ray-schema.json plus
its cross-field checks), with the network blocked so no step can quietly reach the cloud.
"""

from __future__ import annotations

import copy
import itertools
import re
import shlex
import socket
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from jobs.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
RAYJOB_YAML = ROOT / "kuberay" / "rayjob.yaml"
CACHE_ENV = ("ANIMA_CACHE", "HF_HOME")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("config validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def load_cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_up_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does to the file before the provider (AWS) is touched."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture
def cluster() -> dict[str, Any]:
    return ray_up_validate(load_cluster())


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return yaml.safe_load(RAYJOB_YAML.read_text())


def docker_env(run_options: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(-e NAME=VALUE settings, -v HOST:CONTAINER mounts) of docker run options."""
    env: dict[str, str] = {}
    mounts: dict[str, str] = {}
    tokens = [token for option in run_options for token in shlex.split(option)]
    for flag, value in itertools.pairwise(tokens):
        if flag in ("-e", "--env"):
            name, _, setting = value.partition("=")
            env[name] = setting
        elif flag in ("-v", "--volume"):
            host, container = value.split(":")[:2]
            mounts[container] = host
    return env, mounts


# -- cluster.yaml ---------------------------------------------------------------------------------


def test_cluster_yaml_passes_ray_launcher_validation() -> None:
    prepared = ray_up_validate(load_cluster())
    assert prepared["cluster_name"] == "anima"
    assert prepared["provider"]["type"] == "aws"


INVALID = jsonschema.ValidationError


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        pytest.param(lambda c: c.update(max_worker_nodes=8), INVALID, id="unknown-key"),
        pytest.param(lambda c: c.update(max_workers="eight"), INVALID, id="max-workers-str"),
        pytest.param(
            lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU="one"),
            INVALID,
            id="gpu-count-str",
        ),
        pytest.param(
            lambda c: c["available_node_types"]["gpu_worker"].pop("node_config"),
            INVALID,
            id="no-node-config",
        ),
        pytest.param(lambda c: c["docker"].update(gpus=True), INVALID, id="docker-key"),
        pytest.param(lambda c: c.update(head_node_type="cpu_head"), ValueError, id="head-type-missing"),
        pytest.param(
            lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=9),
            ValueError,
            id="min-workers-over-max",
        ),
    ],
)
def test_broken_cluster_yaml_fails_validation(mutate: Any, error: type[Exception]) -> None:
    broken = load_cluster()
    mutate(broken)
    with pytest.raises(error):
        ray_up_validate(broken)


def test_head_runs_no_tasks(cluster: dict[str, Any]) -> None:
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0


def test_gpu_worker_type_autoscales_from_zero(cluster: dict[str, Any]) -> None:
    worker = cluster["available_node_types"]["gpu_worker"]
    assert worker["resources"].get("GPU", 0) >= 1, "the autoscaler must know this type serves GPU demand"
    # AWS GPU instance families: g4dn, g5, g6, p3, p4d, p5 ...
    assert worker["node_config"]["InstanceType"][0] in "gp"
    assert worker["min_workers"] == 0
    assert 1 <= worker["max_workers"] <= cluster["max_workers"]
    assert worker["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    volumes = worker["node_config"]["BlockDeviceMappings"]
    assert max(v["Ebs"]["VolumeSize"] for v in volumes) >= 200


def test_autoscaler_settings(cluster: dict[str, Any]) -> None:
    assert cluster["idle_timeout_minutes"] > 0
    assert cluster["upscaling_speed"] > 0


def test_cache_env_reaches_ray_processes_and_sits_on_mounted_disk(cluster: dict[str, Any]) -> None:
    docker = cluster["docker"]
    env, mounts = docker_env(docker["run_options"])
    start = " ".join(cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"])
    for name in CACHE_ENV:
        # Container-wide `-e` (inherited by `ray start` and every worker/driver) or an export in
        # the start commands.
        value = env.get(name)
        if value is None:
            assert f"export {name}=" in start, f"{name} is not set for Ray processes"
            continue
        mount = next((path for path in mounts if value.startswith(path.rstrip("/") + "/")), None)
        assert mount is not None, f"{name}={value} is not on a bind-mounted host disk ({mounts})"
    assert "--ulimit nofile=65536:65536" in docker["run_options"]


def test_docker_image_is_a_ray_gpu_image(cluster: dict[str, Any]) -> None:
    image = cluster["docker"]["image"]
    assert image.startswith("rayproject/ray:")
    assert "-gpu" in image


def test_setup_installs_anima_on_every_node(cluster: dict[str, Any]) -> None:
    # prepare_config merges setup_commands into both lists, as `ray up` runs them.
    for commands in (cluster["head_setup_commands"], cluster["worker_setup_commands"]):
        installs = [c for c in commands if "pip install" in c and "anima" in c]
        assert installs, commands
        assert all(_extras(c) >= {"s3", "gcs"} for c in installs), installs  # outputs live on S3/GCS


def _extras(requirement: str) -> set[str]:
    """The extras of an `anima[...]` requirement inside a command or a pip list entry."""
    match = re.search(r"anima\[([^\]]*)\]", requirement)
    return {e.strip() for e in match.group(1).split(",")} if match else set()


def test_start_commands(cluster: dict[str, Any]) -> None:
    head = " ; ".join(cluster["head_start_ray_commands"])
    worker = " ; ".join(cluster["worker_start_ray_commands"])
    assert cluster["head_start_ray_commands"][0] == "ray stop"
    assert "ray start --head" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "ulimit -n 65536" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker
    assert "ulimit -n 65536" in worker


# -- kuberay/rayjob.yaml ---------------------------------------------------------------------------


def worker_groups(rayjob: dict[str, Any]) -> list[dict[str, Any]]:
    return rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]


def test_rayjob_kind_and_lifecycle(rayjob: dict[str, Any]) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    assert spec["backoffLimit"] >= 1
    assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True


def test_rayjob_entrypoint_runs_anima(rayjob: dict[str, Any]) -> None:
    entrypoint = rayjob["spec"]["entrypoint"]
    assert entrypoint.startswith("python -m jobs")
    args = build_parser().parse_args(shlex.split(entrypoint)[3:])  # the real CLI accepts it
    assert args.command in ("generate", "evaluate", "train")
    assert args.output.startswith("s3://")
    assert args.gpus_per_actor >= 1


def test_rayjob_gpu_workers(rayjob: dict[str, Any]) -> None:
    gpu_groups = [
        group
        for group in worker_groups(rayjob)
        if any(
            "nvidia.com/gpu" in container.get("resources", {}).get("limits", {})
            for container in group["template"]["spec"]["containers"]
        )
    ]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for group in gpu_groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1


def test_rayjob_runtime_env_and_cache_volume(rayjob: dict[str, Any]) -> None:
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)  # Ray's own runtime_env checks
    assert runtime_env["working_dir"]
    assert any(_extras(p) >= {"s3", "gcs"} for p in runtime_env["pip"]), runtime_env["pip"]
    env_vars = runtime_env["env_vars"]
    for group in worker_groups(rayjob):
        for container in group["template"]["spec"]["containers"]:
            mounted = [m["mountPath"].rstrip("/") + "/" for m in container.get("volumeMounts", [])]
            for name in CACHE_ENV:
                assert any(env_vars[name].startswith(path) for path in mounted), (
                    f"{name}={env_vars[name]} is not on a volume of {group['groupName']}"
                )


def test_ray_runtime_env_rejects_a_bad_env(rayjob: dict[str, Any]) -> None:
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    runtime_env["env_vars"] = {"ANIMA_CACHE": 1}
    with pytest.raises(TypeError):
        RuntimeEnv(**runtime_env)


def test_ray_versions_agree(cluster: dict[str, Any], rayjob: dict[str, Any]) -> None:
    ray_version = str(rayjob["spec"]["rayClusterSpec"]["rayVersion"])
    images = [cluster["docker"]["image"]]
    cluster_spec = rayjob["spec"]["rayClusterSpec"]
    for group in [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]:
        images += [c["image"] for c in group["template"]["spec"]["containers"]]
    for image in images:
        assert image.split(":", 1)[1].startswith(f"{ray_version}-"), image
