"""deploy/: the Kubernetes manifests and the docker-compose trial, checked without a cluster
or a Docker engine. Every file parses, and what the files say agrees with the Dockerfile, with
the service's own settings (tokensvc.config, the CLI) and with each other. The probe commands
of the Deployment are also run against a real tokensvc over mTLS.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from grpc_health.v1 import health_pb2
from opentelemetry import environment_variables as otel_api_env
from opentelemetry.sdk import environment_variables as otel_sdk_env

from tokensvc import config
from tokensvc.cli import main as cli
from tokensvc.cli.devcerts import write_dev_pki
from tokensvc.config import env as config_env
from tokensvc.config import flags as config_flags
from tokensvc.keys.ring import KeyRingError, load_kek
from tokensvc.redis.embedded import free_port
from tokensvc.security.policy import CallerPolicy

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "docker-compose.yml"
COLLECTOR = DEPLOY / "otel-collector.yaml"

#: Secrets the operator creates (never part of the kustomization), with the keys the
#: Deployment reads from each. secret.example.yaml / certificate.example.yaml document them.
OPERATOR_SECRETS: dict[str, set[str]] = {
    "tokensvc-kek": {"kek.json"},
    "tokensvc-tls": {"tls.crt", "tls.key", "ca.crt"},
    "tokensvc-redis": {"url"},
}
#: Documentation in kubernetes/ that the kustomization must not apply.
EXAMPLES = {"secret.example.yaml", "certificate.example.yaml"}
#: What a complete deployment consists of.
REQUIRED_KINDS = {
    "Deployment",
    "Service",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
    "NetworkPolicy",
    "ServiceAccount",
}
#: Environment of `tokensvc health` (tokensvc/cli.py).
HEALTH_ENV = {
    "TOKENSVC_HEALTH_TARGET",
    "TOKENSVC_HEALTH_CA",
    "TOKENSVC_HEALTH_CERT",
    "TOKENSVC_HEALTH_KEY",
}
#: OTEL_TRACES_EXPORTER values tokensvc.observe.tracing understands.
TRACE_EXPORTERS = {"otlp", "console", "none"}
OTEL_ENV = {
    value
    for module in (otel_api_env, otel_sdk_env)
    for name, value in vars(module).items()
    if name.startswith("OTEL_") and isinstance(value, str)
}
SETTINGS_ENV = {"TOKENSVC_" + name.upper() for name in (*config_flags.OPTIONS, *config_flags.FLAGS)}
PATH_SETTINGS = {
    "TOKENSVC_" + name.upper() for name, (_, kind) in config_flags.OPTIONS.items() if kind is Path
}


# --- the Dockerfile -----------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def _dockerfile_uid() -> int:
    """The uid of `useradd --uid N ... NAME`, which the final `USER` must name (N or NAME)."""
    ops = _dockerfile()
    added = [
        (m.group(1), arg.split()[-1])
        for op, arg in ops
        if op == "RUN"
        for m in [re.search(r"useradd .*--uid[= ](\d+)", arg)]
        if m
    ]
    assert len(added) == 1, "the Dockerfile creates no user with a fixed uid"
    uid, name = added[0]
    user = [arg for op, arg in ops if op == "USER"][-1]
    assert user in (uid, name), f"USER {user} is not the user created with uid {uid}"
    return int(uid)


def _dockerfile_env() -> dict[str, str]:
    env = " ".join(arg for op, arg in _dockerfile() if op == "ENV")
    return dict(re.findall(r"(\w+)=(\S+)", env))


def _dockerfile_exposed() -> list[int]:
    """The ports of the Dockerfile's one EXPOSE line, gRPC first."""
    (exposed,) = [arg for op, arg in _dockerfile() if op == "EXPOSE"]
    return [int(port.split("/")[0]) for port in exposed.split()]


def _dockerfile_port() -> int:
    port = _dockerfile_exposed()[0]
    assert _port(_dockerfile_env()["TOKENSVC_LISTEN"]) == port
    return port


def test_the_dockerfile_exposes_every_port_the_manifests_listen_on():
    env = _config_env()
    wanted = {_port(env[name]) for name in ("TOKENSVC_LISTEN", "TOKENSVC_HTTP_LISTEN")}
    wanted |= {_port(env["TOKENSVC_METRICS_LISTEN"])} if "TOKENSVC_METRICS_LISTEN" in env else set()
    assert wanted <= set(_dockerfile_exposed())


def test_compose_publishes_no_redis_on_the_host():
    """Redis without a password must not be reachable from the host (nor collide with a
    local Redis on 6379)."""
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    assert not compose["services"]["redis"].get("ports")


def _dockerfile_healthcheck() -> tuple[dict[str, str], list[str]]:
    arg = next(arg for op, arg in _dockerfile() if op == "HEALTHCHECK")
    options, _, command = arg.partition(" CMD ")
    return dict(re.findall(r"--([\w-]+)=(\S+)", options)), json.loads(command)


def _dockerfile_image_name() -> str:
    """The tag of the Dockerfile's documented build command (`docker build -t NAME .`)."""
    match = re.search(r"docker build -t (\S+)", (ROOT / "Dockerfile").read_text())
    assert match
    return match.group(1)


def _project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


# --- helpers ------------------------------------------------------------------------------


def _docs(path: Path) -> list[Any]:
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def _one(path: Path) -> dict[str, Any]:
    docs = _docs(path)
    assert len(docs) == 1 and isinstance(docs[0], dict), path
    return docs[0]


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _env_file(path: Path) -> dict[str, str]:
    """A kustomize env file: KEY=VALUE lines, # comments."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            assert key.strip() not in values, f"{path.name}: {key} twice"
            values[key.strip()] = value
    return values


def _known_env(name: str) -> bool:
    return name in SETTINGS_ENV or name in HEALTH_ENV or name in OTEL_ENV


def _kustomization() -> dict[str, Any]:
    return _one(K8S / "kustomization.yaml")


def _resources() -> list[dict[str, Any]]:
    return [doc for name in _kustomization()["resources"] for doc in _docs(K8S / name)]


def _kind(kind: str) -> dict[str, Any]:
    found = [doc for doc in _resources() if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} in the kustomization"
    return found[0]


def _generated_configmaps() -> dict[str, dict[str, str]]:
    """ConfigMaps of the kustomization (generated and listed), as {name: {key: value}}."""
    maps: dict[str, dict[str, str]] = {}
    for gen in _kustomization().get("configMapGenerator", []):
        data: dict[str, str] = {}
        for env in gen.get("envs", []):
            data.update(_env_file(K8S / env))
        for entry in gen.get("files", []):
            key, _, source = entry.rpartition("=")
            data[key or Path(source).name] = (K8S / source).read_text()
        data.update(dict(item.split("=", 1) for item in gen.get("literals", [])))
        maps[gen["name"]] = data
    for doc in _resources():
        if doc["kind"] == "ConfigMap":
            maps[doc["metadata"]["name"]] = dict(doc.get("data", {}))
    return maps


def _deployment() -> dict[str, Any]:
    return _kind("Deployment")


def _pod() -> dict[str, Any]:
    return _deployment()["spec"]["template"]["spec"]


def _container() -> dict[str, Any]:
    containers = _pod()["containers"]
    assert len(containers) == 1
    return containers[0]


def _pod_labels() -> dict[str, str]:
    return _deployment()["spec"]["template"]["metadata"]["labels"]


def _selects_pods(selector: dict[str, Any]) -> bool:
    """A label selector (matchLabels only) that is non-empty and matches the pod template."""
    assert set(selector) == {"matchLabels"}, selector
    labels = selector["matchLabels"]
    return bool(labels) and labels.items() <= _pod_labels().items()


def _container_ports() -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in _container()["ports"]}


def _literal_env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in _container()["env"] if "value" in e}


def _config_env() -> dict[str, str]:
    """Environment the container gets from ConfigMaps (envFrom)."""
    maps = _generated_configmaps()
    env: dict[str, str] = {}
    for source in _container().get("envFrom", []):
        assert "prefix" not in source
        env.update(maps[source["configMapRef"]["name"]])
    return env


def _cpu(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _cpu_limit() -> int:
    """CPU limit rounded up, as Kubernetes' resourceFieldRef with divisor 1 reports it."""
    return math.ceil(_cpu(str(_container()["resources"]["limits"]["cpu"])))


def _localise(env: dict[str, str], root: Path) -> dict[str, str]:
    """``env`` with every file setting moved under ``root`` (files created, empty)."""
    out = dict(env)
    for name, value in env.items():
        if name in PATH_SETTINGS:
            path = root / value.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
            out[name] = str(path)
    return out


# --- every file ---------------------------------------------------------------------------


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_every_yaml_file_parses():
    files = _yaml_files()
    assert {COMPOSE, COLLECTOR, K8S / "kustomization.yaml"} <= set(files)
    for path in files:
        docs = _docs(path)
        assert docs and all(isinstance(doc, dict) for doc in docs), path
        if path.parent == K8S and path.name != "kustomization.yaml":
            for doc in docs:
                assert doc.get("apiVersion") and doc.get("kind"), path
                meta = doc["metadata"]
                assert meta.get("name"), path
                # namespace-agnostic: `kubectl apply -n` or an overlay picks it
                assert "namespace" not in meta, path


def test_kustomization_lists_existing_files_and_every_manifest():
    kust = _kustomization()
    assert kust["kind"] == "Kustomization"
    assert "namespace" not in kust
    listed = set(kust["resources"])
    for gen in kust.get("configMapGenerator", []) + kust.get("secretGenerator", []):
        listed |= set(gen.get("envs", []))
        listed |= {entry.rpartition("=")[2] for entry in gen.get("files", [])}
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization lists {name}, which does not exist"
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert manifests - EXAMPLES <= set(kust["resources"]), "a manifest is not applied"
    assert not EXAMPLES & listed, "an example would be applied"
    assert manifests >= EXAMPLES
    kinds = {doc["kind"] for doc in _resources()}
    assert kinds >= REQUIRED_KINDS
    assert "Secret" not in kinds and not kust.get("secretGenerator"), "secrets are never here"


def test_image_is_the_dockerfiles_at_the_project_version():
    name = _dockerfile_image_name()
    repo, _, tag = _container()["image"].rpartition(":")
    assert repo == name and tag == _project_version()
    images = {i["name"]: i for i in _kustomization().get("images", [])}
    assert images[name].get("newTag", tag) == _project_version()
    assert "command" not in _container() and "args" not in _container()  # ENTRYPOINT serve


# --- Deployment ---------------------------------------------------------------------------


def test_deployment_is_replicated_and_rolls_without_losing_capacity():
    spec = _deployment()["spec"]
    assert spec["replicas"] >= 2
    assert _selects_pods(spec["selector"])
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["strategy"]["rollingUpdate"]["maxSurge"] >= 1
    pod = _pod()
    spread = [
        c
        for c in pod.get("topologySpreadConstraints", [])
        if c["topologyKey"] == "kubernetes.io/hostname"
    ]
    anti = (
        pod.get("affinity", {})
        .get("podAntiAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution", [])
    )
    assert spread or anti, "replicas are not spread across nodes"
    for constraint in spread:
        assert constraint["maxSkew"] == 1 and _selects_pods(constraint["labelSelector"])
    assert _kind("ServiceAccount")["metadata"]["name"] == pod["serviceAccountName"]
    assert pod["automountServiceAccountToken"] is False
    # service links would put TOKENSVC_SERVICE_HOST, TOKENSVC_PORT, ... into the namespace
    # of the service's settings
    assert pod["enableServiceLinks"] is False


def test_runs_as_the_dockerfiles_user_locked_down():
    uid = _dockerfile_uid()
    pod_ctx = _pod()["securityContext"]
    ctx = _container()["securityContext"]
    assert pod_ctx["runAsNonRoot"] is True and pod_ctx["runAsUser"] == uid
    assert ctx.get("runAsUser", uid) == uid and ctx.get("runAsNonRoot", True) is True
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"] and not ctx["capabilities"].get("add")
    seccomp = ctx.get("seccompProfile") or pod_ctx.get("seccompProfile")
    assert seccomp == {"type": "RuntimeDefault"}
    # the read-only root needs writable scratch space where the image writes
    volumes = {v["name"]: v for v in _pod()["volumes"]}
    writable = {
        m["mountPath"]
        for m in _container()["volumeMounts"]
        if "emptyDir" in volumes[m["name"]] and not m.get("readOnly")
    }
    assert {_dockerfile_env()["TOKENSVC_DATA_DIR"], "/tmp"} <= writable


def test_ports_agree_with_the_dockerfile_settings_and_service():
    port = _dockerfile_port()
    ports = _container_ports()
    env = _config_env() | _literal_env()
    assert ports["grpc"] == port == _port(env["TOKENSVC_LISTEN"])
    assert ports["https-jwks"] == _port(env["TOKENSVC_HTTP_LISTEN"])
    assert ports["metrics"] == _port(env["TOKENSVC_METRICS_LISTEN"])
    assert len(set(ports.values())) == len(ports)

    service = _kind("Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert _selects_pods({"matchLabels": service["spec"]["selector"]})
    targets = {}
    for entry in service["spec"]["ports"]:
        target = entry["targetPort"]
        targets[entry["name"]] = ports[target] if isinstance(target, str) else target
        assert targets[entry["name"]] in ports.values(), f"{entry['name']}: no such port"
    assert targets["grpc"] == port
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["appProtocol"] == "grpc"
    assert targets["https-jwks"] == ports["https-jwks"]


def test_probes_exec_tokensvc_health():
    container = _container()
    health_timeout = cli.build_parser().parse_args(["health"]).timeout
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert set(probe) & {"exec", "grpc", "tcpSocket", "httpGet"} == {"exec"}, kind
        assert "tokensvc health" in " ".join(probe["exec"]["command"]), kind
        # the probe's own deadline must not cut `tokensvc health --timeout` short
        assert probe["timeoutSeconds"] > health_timeout, kind
    # readiness is the command's exit status as it is: 0 only for SERVING
    assert container["readinessProbe"]["exec"]["command"] == ["tokensvc", "health"]
    env = _literal_env()
    assert _port(env["TOKENSVC_HEALTH_TARGET"]) == _container_ports()["grpc"]
    assert env["TOKENSVC_HEALTH_TARGET"].startswith("127.0.0.1:")
    # mTLS server: the probe presents a certificate the client CA accepts
    assert "TOKENSVC_TLS_CLIENT_CA" in env
    assert env["TOKENSVC_HEALTH_CA"] == env["TOKENSVC_TLS_CLIENT_CA"]
    assert env["TOKENSVC_HEALTH_CERT"] and env["TOKENSVC_HEALTH_KEY"]


def _probe(command: list[str], target: str, pki: Any) -> int:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TOKENSVC_HEALTH_TARGET": target,
        "TOKENSVC_HEALTH_CA": str(pki["admin"].ca),
        "TOKENSVC_HEALTH_CERT": str(pki["admin"].cert),
        "TOKENSVC_HEALTH_KEY": str(pki["admin"].key),
    }
    return subprocess.run(command, env=env, capture_output=True, timeout=60).returncode


def test_probe_commands_against_a_real_server(mtls_service, dev_pki):
    """Readiness passes only while SERVING; liveness while the server answers at all (also
    NOT_SERVING: draining, Redis down); both fail when nothing answers. The server runs with
    the deployment's caller policy."""
    assert (Path(sys.executable).parent / "tokensvc").is_file()
    container = _container()
    ready = container["readinessProbe"]["exec"]["command"]
    live = container["livenessProbe"]["exec"]["command"]
    startup = container["startupProbe"]["exec"]["command"]
    policy = _generated_configmaps()["tokensvc-policy"]["policy.toml"]
    svc = mtls_service(policy)
    assert _probe(startup, svc.target, dev_pki) == 0
    assert _probe(ready, svc.target, dev_pki) == 0
    assert _probe(live, svc.target, dev_pki) == 0

    # what SIGTERM (and, every second, a lost Redis) does: NOT_SERVING, still answering
    health = svc.server.running.health
    svc.server.run(health.enter_graceful_shutdown())
    reply = svc.server.run(health.Check(health_pb2.HealthCheckRequest(), None))
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert _probe(ready, svc.target, dev_pki) != 0
    assert _probe(live, svc.target, dev_pki) == 0

    nothing = f"127.0.0.1:{free_port()}"
    assert _probe(ready, nothing, dev_pki) != 0
    assert _probe(live, nothing, dev_pki) != 0


def test_shutdown_outlasts_prestop_and_grace():
    pod = _pod()
    pre_stop = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(pre_stop[1])
    assert drain > 0
    assert pod["terminationGracePeriodSeconds"] > drain + config.Settings().grace_seconds


def test_resources_and_workers_follow_the_cpu_limit():
    resources = _container()["resources"]
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[part]), part
    assert _cpu(str(resources["requests"]["cpu"])) <= _cpu(str(resources["limits"]["cpu"]))
    assert int(_workers()["value"]) == _cpu_limit()
    assert 1 <= _cpu_limit() <= 256


def _workers() -> dict[str, Any]:
    return next(e for e in _container()["env"] if e["name"] == "TOKENSVC_WORKERS")


def test_the_podmonitor_scrapes_every_workers_metrics_port():
    # worker i serves --metrics-listen PORT+i: each one must be a declared, scraped port,
    # else Prometheus sees only some workers' counters
    workers = int(_workers()["value"])
    first = _port((_config_env() | _literal_env())["TOKENSVC_METRICS_LISTEN"])
    by_number = {number: name for name, number in _container_ports().items()}
    (monitor,) = _docs(K8S / "monitoring" / "podmonitor.yaml")
    scraped = {endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]}
    for number in range(first, first + workers):
        assert by_number.get(number) in scraped, number


def test_environment_names_are_real_settings():
    names = [e["name"] for e in _container()["env"]]
    assert len(names) == len(set(names))
    from_maps = _config_env()
    assert not set(names) & set(from_maps), "set twice: ConfigMap and Deployment"
    for name in [*names, *from_maps]:
        assert _known_env(name), f"{name} is not a tokensvc setting"
    assert "TOKENSVC_INSECURE" not in [*names, *from_maps]
    # the Redis URL may carry a password: only from a Secret
    assert "TOKENSVC_REDIS_URL" not in from_maps and "TOKENSVC_REDIS_URL" not in _literal_env()
    assert from_maps["OTEL_TRACES_EXPORTER"] in TRACE_EXPORTERS
    for name in HEALTH_ENV:
        assert _health_reads(name), f"`tokensvc health` does not read {name}"


def _health_reads(name: str) -> bool:
    """Whether `tokensvc health` takes a default from the environment variable ``name``."""
    import os

    from tokensvc.cli import main as cli

    flag = name.removeprefix("TOKENSVC_HEALTH_").lower()
    old = os.environ.get(name)
    os.environ[name] = "127.0.0.9:1" if flag == "target" else "/from/env"
    try:
        args = cli.build_parser().parse_args(["health"])
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old
    return getattr(args, flag) in ("127.0.0.9:1", "/from/env")


def _references() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """ConfigMaps and Secrets the pod uses: {name: keys} (empty set: all keys)."""
    maps: dict[str, set[str]] = {}
    secrets: dict[str, set[str]] = {}
    container = _container()
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            maps.setdefault(source["configMapRef"]["name"], set())
        if "secretRef" in source:
            secrets.setdefault(source["secretRef"]["name"], set())
    for env in container["env"]:
        ref = env.get("valueFrom", {})
        if "configMapKeyRef" in ref:
            maps.setdefault(ref["configMapKeyRef"]["name"], set()).add(
                ref["configMapKeyRef"]["key"]
            )
        if "secretKeyRef" in ref:
            secrets.setdefault(ref["secretKeyRef"]["name"], set()).add(ref["secretKeyRef"]["key"])
    for volume in _pod()["volumes"]:
        for kind, name_key, out in (("secret", "secretName", secrets), ("configMap", "name", maps)):
            if kind in volume:
                keys = out.setdefault(volume[kind][name_key], set())
                keys |= {item["key"] for item in volume[kind].get("items", [])}
    return maps, secrets


def test_every_configmap_and_secret_the_pod_uses_exists_or_is_operator_provided():
    maps, secrets = _references()
    generated = _generated_configmaps()
    for name, keys in maps.items():
        assert name in generated, f"ConfigMap {name} is not in the kustomization"
        assert keys <= set(generated[name]), f"ConfigMap {name} lacks {keys - set(generated[name])}"
    assert set(secrets) == set(OPERATOR_SECRETS), "OPERATOR_SECRETS is not what the pod uses"
    for name, keys in secrets.items():
        assert keys <= OPERATOR_SECRETS[name], name


def test_file_settings_point_into_their_mounts():
    env = _literal_env()
    volumes = {v["name"]: v for v in _pod()["volumes"]}
    mounts = {m["mountPath"]: m for m in _container()["volumeMounts"]}
    generated = _generated_configmaps()
    files = [
        name
        for name in env
        if name in PATH_SETTINGS or name in HEALTH_ENV - {"TOKENSVC_HEALTH_TARGET"}
    ]
    assert {"TOKENSVC_KEK_FILE", "TOKENSVC_TLS_CERT", "TOKENSVC_POLICY_FILE"} <= set(files)
    for name in files:
        path = Path(env[name])
        mount = mounts.get(str(path.parent))
        assert mount, f"{name}={path}: nothing mounted at {path.parent}"
        # whole-directory, read-only: Kubernetes updates such mounts (certificate rotation)
        assert "subPath" not in mount and mount["readOnly"] is True, name
        volume = volumes[mount["name"]]
        if "secret" in volume:
            source = volume["secret"]
            provided = OPERATOR_SECRETS[source["secretName"]]
        else:
            source = volume["configMap"]
            provided = set(generated[source["name"]])
        items = {item["path"]: item["key"] for item in source.get("items", [])}
        key = items.get(path.name, path.name if not items else None)
        assert key in provided, f"{name}={path}: {mount['name']} has no such file"
        assert source.get("defaultMode", 0o644) & 0o007 == 0, f"{name}: world-readable"


def test_settings_of_the_deployment_pass_tokensvc_validation(tmp_path):
    secret = {doc["metadata"]["name"]: doc for doc in _docs(K8S / "secret.example.yaml")}
    env = _config_env() | _literal_env()
    env["TOKENSVC_REDIS_URL"] = secret["tokensvc-redis"]["stringData"]["url"]
    env["TOKENSVC_WORKERS"] = str(_cpu_limit())
    settings = config_env.load(env=_localise(env, tmp_path))
    assert settings.port == _dockerfile_port() and settings.host == "0.0.0.0"
    assert not settings.insecure and settings.tls_client_ca is not None
    assert settings.kek_file is not None and settings.policy_file is not None
    assert settings.workers == _cpu_limit()


def test_policy_configmap_is_a_valid_policy_shaped_like_the_example():
    text = _generated_configmaps()["tokensvc-policy"]["policy.toml"]
    CallerPolicy.from_toml(text, "deploy policy")
    example = tomllib.loads((ROOT / "examples" / "policy.toml").read_text())
    mine = tomllib.loads(text)
    assert set(mine) == set(example) == {"rpc"}
    assert set(example["rpc"]) <= set(mine["rpc"])
    for rule in mine["rpc"].values():
        for identity in rule.get("allow", []):
            assert identity == "*" or identity.startswith("spiffe://"), identity


# --- PDB, HPA, NetworkPolicy --------------------------------------------------------------


def test_pdb_selects_the_pods_and_allows_one_disruption():
    pdb = _kind("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert _selects_pods(pdb["spec"]["selector"])
    assert pdb["spec"]["selector"] == _deployment()["spec"]["selector"]
    floor = min(
        _deployment()["spec"]["replicas"], _kind("HorizontalPodAutoscaler")["spec"]["minReplicas"]
    )
    spec = pdb["spec"]
    assert ("minAvailable" in spec) != ("maxUnavailable" in spec)
    if "minAvailable" in spec:
        assert 1 <= spec["minAvailable"] < floor  # a drain can always proceed
    else:
        assert 1 <= spec["maxUnavailable"] < floor


def test_hpa_scales_the_deployment_on_cpu():
    hpa = _kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    deployment = _deployment()
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        "Deployment",
        deployment["metadata"]["name"],
    )
    spec = hpa["spec"]
    assert 2 <= spec["minReplicas"] == deployment["spec"]["replicas"] < spec["maxReplicas"]
    cpu = [
        m["resource"]["target"]
        for m in spec["metrics"]
        if m["type"] == "Resource" and m["resource"]["name"] == "cpu"
    ]
    assert cpu and cpu[0]["type"] == "Utilization" and 0 < cpu[0]["averageUtilization"] <= 100
    assert "cpu" in _container()["resources"]["requests"]  # utilisation is of the request


def _rule_ports(rules: list[dict[str, Any]]) -> set[int]:
    return {port["port"] for rule in rules for port in rule.get("ports", [])}


def test_networkpolicy_selects_the_pods_and_opens_only_what_is_needed():
    policy = _kind("NetworkPolicy")
    spec = policy["spec"]
    assert _selects_pods(spec["podSelector"])
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    ports = _container_ports()
    assert _rule_ports(spec["ingress"]) == {ports["grpc"], ports["https-jwks"], ports["metrics"]}
    for rule in spec["ingress"]:
        assert rule.get("from") and rule.get("ports"), "ingress open to everyone"
    egress = _rule_ports(spec["egress"])
    otlp = _port(_config_env()["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert {53, 6379, 26379, otlp} == egress
    for rule in spec["egress"]:
        assert rule.get("to") and rule.get("ports"), "egress open to everyone"


# --- examples of the operator's part ------------------------------------------------------


def test_examples_document_the_operator_secrets_without_real_values(tmp_path):
    secrets = {doc["metadata"]["name"]: doc for doc in _docs(K8S / "secret.example.yaml")}
    (certificate,) = _docs(K8S / "certificate.example.yaml")
    documented = {name: set(doc["stringData"]) for name, doc in secrets.items()}
    documented[certificate["spec"]["secretName"]] = {"tls.crt", "tls.key", "ca.crt"}
    assert documented == OPERATOR_SECRETS
    assert all(doc["kind"] == "Secret" and "data" not in doc for doc in secrets.values())
    # the KEK placeholder must not be a usable key
    kek = tmp_path / "kek.json"
    kek.write_text(secrets["tokensvc-kek"]["stringData"]["kek.json"])
    with pytest.raises(KeyRingError):
        load_kek(kek, tmp_path)
    # the certificate serves, is also the probe's client certificate, and names the probe target
    spec = certificate["spec"]
    assert {"server auth", "client auth"} <= set(spec["usages"])
    probe_host = _literal_env()["TOKENSVC_HEALTH_TARGET"].rsplit(":", 1)[0]
    assert probe_host in spec.get("ipAddresses", []) + spec.get("dnsNames", [])


# --- docker-compose -----------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return _one(COMPOSE)


def _compose_env() -> dict[str, str]:
    env = _compose()["services"]["tokensvc"]["environment"]
    assert isinstance(env, dict)
    return {k: str(v) for k, v in env.items()}


def _published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    out = []
    for entry in service.get("ports", []):
        host_ip, host_port, container_port = str(entry).split(":")
        out.append((host_ip, int(host_port), int(container_port)))
    return out


def test_compose_services_and_build():
    services = _compose()["services"]
    assert {"tokensvc", "redis", "otel-collector"} <= set(services)
    build = services["tokensvc"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert (context / build.get("dockerfile", "Dockerfile")).is_file()
    assert context == ROOT
    assert services["tokensvc"]["image"].split(":")[0] == _dockerfile_image_name()
    redis = services["redis"]
    assert redis["image"].split(":")[0] == "redis" and ":" in redis["image"]
    assert "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    collector = services["otel-collector"]
    assert collector["image"].startswith("otel/opentelemetry-collector")
    assert ":" in collector["image"], "pin the collector version"
    depends = services["tokensvc"]["depends_on"]
    assert depends["redis"]["condition"] == "service_healthy"
    assert "otel-collector" in depends


def test_compose_mounts_exist():
    services = _compose()["services"]
    named = set(_compose().get("volumes", {}))
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("."):
                path = (DEPLOY / source).resolve()
                # .tokensvc/certs is written by `make certs`, as the comment says
                if path == ROOT / ".tokensvc" / "certs":
                    assert "tokensvc certs .tokensvc/certs" in (ROOT / "Makefile").read_text()
                    assert "make certs" in COMPOSE.read_text()
                else:
                    assert path.exists(), f"{name}: {source} does not exist"
            else:
                assert source in named, f"{name}: volume {source} is not declared"
    collector = services["otel-collector"]
    config_path = next(a.split("=", 1)[1] for a in collector["command"] if a.startswith("--config"))
    mounted = {str(v).split(":")[1]: str(v).split(":")[0] for v in collector["volumes"]}
    assert (DEPLOY / mounted[config_path]).resolve() == COLLECTOR


def test_compose_ports_are_local_and_match_the_dockerfile():
    services = _compose()["services"]
    for name, service in services.items():
        for host_ip, _, _ in _published(service):
            assert host_ip == "127.0.0.1", f"{name} is published beyond localhost"
    env = _compose_env()
    port = _dockerfile_port()
    assert _port(env["TOKENSVC_LISTEN"]) == port
    published = {container: host for _, host, container in _published(services["tokensvc"])}
    assert published[port] == port
    assert _port(env["TOKENSVC_HTTP_LISTEN"]) in published


def test_compose_environment_is_real_and_valid(tmp_path):
    env = _compose_env()
    for name in env:
        assert _known_env(name), f"{name} is not a tokensvc setting"
    assert "TOKENSVC_INSECURE" not in env
    assert env["OTEL_TRACES_EXPORTER"] in TRACE_EXPORTERS
    services = _compose()["services"]
    # the names `make certs` writes, mounted where the settings look for them
    pki = tmp_path / "pki"
    write_dev_pki(pki)
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in services["tokensvc"]["volumes"]}
    for name, value in env.items():
        if name in PATH_SETTINGS or name in HEALTH_ENV - {"TOKENSVC_HEALTH_TARGET"}:
            path = Path(value)
            source = mounts.get(str(path)) or mounts.get(str(path.parent))
            assert source, f"{name}={value}: not mounted"
            if source == "pki":
                assert (pki / path.name).is_file(), f"{name}: make certs writes no {path.name}"
            elif source.startswith("."):
                assert (DEPLOY / source).resolve().is_file(), name
    settings = config_env.load(env=_localise(env, tmp_path / "root"))
    assert settings.port == _dockerfile_port() and not settings.insecure
    assert settings.redis_url is not None
    redis_host, redis_port = settings.redis_url.split("//")[1].split("/")[0].rsplit(":", 1)
    assert redis_host in services and redis_port == "6379"
    otlp = env["OTEL_EXPORTER_OTLP_ENDPOINT"].split("//")[1]
    collector_host, collector_port = otlp.rsplit(":", 1)
    assert collector_host in services
    receiver = _one(COLLECTOR)["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert _port(receiver) == int(collector_port)


def test_compose_healthcheck_is_the_dockerfiles():
    options, command = _dockerfile_healthcheck()
    check = _compose()["services"]["tokensvc"]["healthcheck"]
    assert check["test"] == ["CMD", *command]
    for option, value in options.items():
        assert str(check[option.replace("-", "_")]) == value, option


def test_collector_config_receives_otlp_grpc_on_4317():
    collector = _one(COLLECTOR)
    endpoint = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert _port(endpoint) == 4317
    pipelines = collector["service"]["pipelines"]
    assert "traces" in pipelines
    for pipeline in pipelines.values():
        for part in ("receivers", "processors", "exporters"):
            for component in pipeline.get(part, []):
                assert component in collector.get(part, {}), f"{component} is not defined"
        assert pipeline["receivers"] and pipeline["exporters"]
