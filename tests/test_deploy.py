"""deploy/: every manifest parses and keeps the promises of deploy/README.md (no Docker needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from dask.utils import parse_bytes

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
COMPOSE_TLS = DEPLOY / "compose" / "compose.tls.yaml"
KUBERNETES = DEPLOY / "kubernetes"
IMAGE = "spoc-xr"
UID = 10001
TLS_KEYS = (
    "CA_FILE",
    "SCHEDULER__CERT",
    "SCHEDULER__KEY",
    "WORKER__CERT",
    "WORKER__KEY",
    "CLIENT__CERT",
    "CLIENT__KEY",
)
TLS_PREFIX = "DASK_DISTRIBUTED__COMM__TLS__"
REQUIRE_ENCRYPTION = "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"
# Kubernetes quantities: decimal and binary suffixes.
K8S_UNITS = {"": 1, "k": 1000, "M": 1000**2, "G": 1000**3, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
# Docker byte values are binary: "2g" is 2 GiB.
DOCKER_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def load_all(path: Path) -> list[dict[str, Any]]:
    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def k8s_bytes(quantity: str) -> int:
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity)
    assert match, quantity
    return int(float(match[1]) * K8S_UNITS[match[2]])


def docker_bytes(value: str) -> int:
    match = re.fullmatch(r"([0-9.]+)([bkmg]?)b?", value.lower())
    assert match, value
    return int(float(match[1]) * DOCKER_UNITS[match[2]])


def option(args: list[str], name: str) -> str:
    """The value after ``name`` in an argument list (``--flag value`` or ``--flag=value``)."""
    for index, arg in enumerate(args):
        if arg == name:
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


def all_yaml() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def daskcluster() -> dict[str, Any]:
    (cluster,) = load_all(KUBERNETES / "daskcluster.yaml")
    return cluster


def pod_specs() -> dict[str, dict[str, Any]]:
    spec = daskcluster()["spec"]
    return {"scheduler": spec["scheduler"]["spec"], "worker": spec["worker"]["spec"]}


# ----------------------------------------------------------------------------------- parsing


def test_every_yaml_file_parses() -> None:
    files = all_yaml()
    assert {path.name for path in files} >= {
        "compose.yaml",
        "compose.tls.yaml",
        "daskcluster.yaml",
        "namespace.yaml",
        "networkpolicy.yaml",
        "kustomization.yaml",
    }
    for path in files:
        docs = load_all(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(doc, dict) for doc in docs), path


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = load_all(KUBERNETES / "kustomization.yaml")
    manifests = {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_readme_mentions_every_file() -> None:
    readme = (DEPLOY / "README.md").read_text()
    files = [
        path
        for path in DEPLOY.rglob("*")
        if path.is_file() and path.name not in {"README.md", ".gitignore"}
    ]
    assert len(files) >= 8
    for path in files:
        assert f"deploy/{path.relative_to(DEPLOY).as_posix()}" in readme, path


# ------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_runs_as_non_root_and_pins_installs() -> None:
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[0] == "FROM python:3.11-slim"
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user == str(UID)  # numeric: Kubernetes' runAsNonRoot can only verify a number
    install = next(line for line in lines if "pip install" in line)
    assert "-c requirements.lock" in install and ".[s3]" in install
    assert re.search(r"jupyterlab==[0-9.]+", install)


def test_dockerignore_keeps_secrets_out_of_the_context() -> None:
    rules = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert rules[rules.index("**")] == "**"  # everything excluded, then the package let in
    assert "!spoc_xr/**" in rules and "!pyproject.toml" in rules


# ---------------------------------------------------------------------------------- compose


def test_compose_services_image_ports_and_hardening() -> None:
    (compose,) = load_all(COMPOSE)
    services = compose["services"]
    assert set(services) == {"scheduler", "worker", "jupyter"}
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["scheduler"]["build"]["dockerfile"] == "deploy/Dockerfile"
    for name, service in services.items():
        assert IMAGE in service["image"], name
        assert service["user"].split(":")[0] == str(UID), name
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    published = {str(port).split(":")[1] for s in services.values() for port in s.get("ports", [])}
    assert published == {"8786", "8787", "8888"}


def test_compose_worker_memory_limit_equals_container_limit() -> None:
    (compose,) = load_all(COMPOSE)
    worker = compose["services"]["worker"]
    limit = parse_bytes(option(worker["command"], "--memory-limit"))
    assert limit == docker_bytes(worker["mem_limit"])
    (tls,) = load_all(COMPOSE_TLS)
    assert parse_bytes(option(tls["services"]["worker"]["command"], "--memory-limit")) == limit


def test_compose_tls_override_sets_certificates_everywhere() -> None:
    (tls,) = load_all(COMPOSE_TLS)
    services = tls["services"]
    assert set(services) == {"scheduler", "worker", "jupyter"}
    assert option(services["scheduler"]["command"], "--protocol") == "tls"
    assert services["worker"]["command"][2].startswith("tls://")
    assert services["jupyter"]["environment"]["SPOC_XR_SCHEDULER"].startswith("tls://")
    for name, service in services.items():
        env = service["environment"]
        assert env[REQUIRE_ENCRYPTION] == "True", name
        for key in TLS_KEYS:
            assert env[TLS_PREFIX + key].startswith("/etc/dask/tls/"), (name, key)
        assert any(volume.endswith(":/etc/dask/tls:ro") for volume in service["volumes"]), name


# ------------------------------------------------------------------------------- Kubernetes


def test_daskcluster_kind_image_and_replicas() -> None:
    cluster = daskcluster()
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1"
    assert cluster["kind"] == "DaskCluster"
    assert cluster["spec"]["worker"]["replicas"] == 2
    images = {
        container["image"] for spec in pod_specs().values() for container in spec["containers"]
    }
    assert len(images) == 1 and IMAGE in images.pop()  # scheduler and workers: the same image


@pytest.mark.parametrize("role", ["scheduler", "worker"])
def test_daskcluster_security_contexts(role: str) -> None:
    spec = pod_specs()[role]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == UID
    assert spec["automountServiceAccountToken"] is False
    for container in spec["containers"]:
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert context["seccompProfile"]["type"] == "RuntimeDefault"
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]  # the only writable places are emptyDirs
        for mount in container["volumeMounts"]:
            volume = volumes[mount["name"]]
            assert "emptyDir" in volume or mount.get("readOnly") is True, mount


@pytest.mark.parametrize("role", ["scheduler", "worker"])
def test_daskcluster_tls_from_mounted_secret(role: str) -> None:
    spec = pod_specs()[role]
    (container,) = spec["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env[REQUIRE_ENCRYPTION] == "True"
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    tls_volume = next(volume for volume in spec["volumes"] if "secret" in volume)
    mount = mounts[tls_volume["name"]]
    assert mount["readOnly"] is True
    assert tls_volume["secret"]["defaultMode"] & 0o077 == 0o040  # group read only, no others
    for key in TLS_KEYS:
        assert env[TLS_PREFIX + key].startswith(mount["mountPath"] + "/"), key
    args = container["args"]
    if role == "scheduler":
        assert option(args, "--protocol") == "tls"
    else:
        assert args[2].startswith("tls://")


def test_worker_memory_limit_equals_pod_limit_and_local_dir_is_emptydir() -> None:
    spec = pod_specs()["worker"]
    (container,) = spec["containers"]
    args = container["args"]
    limit = parse_bytes(option(args, "--memory-limit"))
    assert limit == k8s_bytes(container["resources"]["limits"]["memory"])
    assert limit == k8s_bytes(container["resources"]["requests"]["memory"])
    local_dir = option(args, "--local-directory")
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == local_dir)
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert "emptyDir" in volume


def test_scheduler_service_is_cluster_internal() -> None:
    service = daskcluster()["spec"]["scheduler"]["service"]
    assert service["type"] == "ClusterIP"
    assert {port["port"] for port in service["ports"]} == {8786, 8787}
    for path in KUBERNETES.glob("*.yaml"):
        for doc in load_all(path):
            if doc.get("kind") == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", path
            assert "nodePort" not in yaml.safe_dump(doc), path
            assert "LoadBalancer" not in yaml.safe_dump(doc), path


def test_namespace_enforces_restricted_pods_and_network_policy() -> None:
    (namespace,) = load_all(KUBERNETES / "namespace.yaml")
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert daskcluster()["metadata"]["namespace"] == namespace["metadata"]["name"]
    (policy,) = load_all(KUBERNETES / "networkpolicy.yaml")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"dask.org/cluster-name": "spoc-xr"}


def test_unit_parsers() -> None:
    assert k8s_bytes("4Gi") == parse_bytes("4GiB") == 4 * 1024**3
    assert docker_bytes("2g") == docker_bytes("2gb") == parse_bytes("2GiB")
    assert k8s_bytes("500M") == 500 * 1000**2
