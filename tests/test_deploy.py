"""deploy/: the Dockerfile, the compose stack and the Kubernetes manifests, checked against
the code they deploy: probe and healthcheck paths are the broker's real routes (taken
from broker/http.py), ports are the port the broker listens on given the variables set
there, every CANCEL_BROKER_* variable is a setting (broker/settings.py) and parses, the
commands are valid `cancel-broker` invocations, and every file they mount exists.

Building the image needs a Docker daemon: that test skips, loudly, without one.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry
from starlette.routing import Route

from broker.cli import build_parser
from broker.findings import SyncState
from broker.http import create_app
from broker.serve import STOP_TIMEOUT_S
from broker.settings import Settings
from tests.processes import ROOT, start_broker

DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"

#: The paths the broker serves, from its own app: a renamed route breaks these tests.
ROUTES = frozenset(
    route.path for route in create_app(CollectorRegistry()).routes if isinstance(route, Route)
)
SETTING_VARIABLES = frozenset(spec.env for spec in Settings.specs())


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def settings_from(environ: dict[str, str]) -> Settings:
    """What `cancel-broker run` makes of these variables (raises if one does not parse)."""
    unknown = {name for name in environ if name.startswith("CANCEL_BROKER_")}
    unknown -= SETTING_VARIABLES
    assert not unknown, f"not settings of broker/settings.py: {sorted(unknown)}"
    return Settings.resolve({}, environ=environ)


def http_path(url: str) -> str:
    return urlsplit(url).path


# -- Dockerfile --------------------------------------------------------------------------


def instructions(path: Path) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            yield keyword.upper(), rest.strip()


def final_stage(path: Path) -> list[tuple[str, str]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            stages.append([])
        stages[-1].append((keyword, rest))
    return stages[-1]


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list), f"use the exec form (a JSON list): {rest}"
    return [str(item) for item in value]


def dockerfile_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def one(stage: list[tuple[str, str]], keyword: str) -> str:
    (found,) = (rest for key, rest in stage if key == keyword)
    return found


def image_uid() -> int:
    user = one(final_stage(DOCKERFILE), "USER").split(":")[0]
    assert user.isdigit(), "a numeric USER, so runAsNonRoot can check it"
    return int(user)


def test_image_runs_as_a_non_root_user() -> None:
    assert image_uid() > 0


def test_image_serves_http_on_the_port_it_exposes() -> None:
    stage = final_stage(DOCKERFILE)
    settings = settings_from(dockerfile_env(stage))
    assert one(stage, "EXPOSE") == str(settings.http_port)
    # Reachable from outside the container, not only on its loopback.
    assert settings.http_host == "0.0.0.0"


def test_image_healthcheck_probes_a_liveness_route() -> None:
    command = exec_form(one(final_stage(DOCKERFILE), "HEALTHCHECK").split(" CMD ", 1)[1])
    (url,) = re.findall(r"http://[^'\"]+", " ".join(command))
    path = http_path(url)
    assert path in ROUTES
    assert liveness_of(path) == 200
    assert "CANCEL_BROKER_HTTP_PORT" in " ".join(command), "follows a changed port"


def test_image_entrypoint_and_command_are_the_cli() -> None:
    stage = final_stage(DOCKERFILE)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert exec_form(one(stage, "ENTRYPOINT")) == ["cancel-broker"]
    assert scripts["cancel-broker"] == "broker.cli:main"
    args = build_parser().parse_args(exec_form(one(stage, "CMD")))
    assert args.command == "run"


def test_image_copies_what_exists_and_is_not_ignored() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for keyword, rest in instructions(DOCKERFILE):
        if keyword == "COPY" and not rest.startswith("--from"):
            *sources, _dest = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert source.rstrip("/") not in ignored, source


# -- docker-compose.yml -------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of each bind mount (relative to the compose file)."""
    found = {}
    for volume in service.get("volumes", []):
        host, container, *_ = volume.split(":")
        if host.startswith((".", "/")):
            found[container] = (COMPOSE.parent / host).resolve()
    return found


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """The file on this machine a service sees at ``container_path``."""
    wanted = PurePosixPath(container_path)
    for container, host in mounts(service).items():
        if wanted == PurePosixPath(container) or PurePosixPath(container) in wanted.parents:
            return host / wanted.relative_to(container)
    raise AssertionError(f"{container_path} is not mounted")


def our_image(service: dict[str, Any]) -> bool:
    build = service.get("build")
    if build is None:
        return False
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
    return True


def test_compose_has_the_whole_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "cancel-broker", "report-worker", "prometheus", "grafana"}
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])


def test_compose_mounts_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for container, host in mounts(service).items():
            assert host.exists(), f"{name}: {host} (mounted at {container}) is missing"


def test_compose_broker_is_a_valid_cli_invocation(compose: dict[str, Any]) -> None:
    broker = compose["services"]["cancel-broker"]
    assert our_image(broker)
    assert "entrypoint" not in broker, "the image's entrypoint is cancel-broker"
    args = build_parser().parse_args(broker["command"])
    assert args.command == "run"
    environ = {**dockerfile_env(final_stage(DOCKERFILE)), **environment(broker)}
    settings = Settings.resolve(args, environ=environ, groups=args.settings_groups)
    settings_from(environ)  # every variable is a setting
    assert urlsplit(settings.redis_url).hostname in compose["services"]
    published = [str(port).split(":") for port in broker["ports"]]
    assert [str(settings.http_port)] * 2 in published


def test_compose_worker_runs_the_example(compose: dict[str, Any]) -> None:
    worker = compose["services"]["report-worker"]
    assert our_image(worker)
    python, script = worker["entrypoint"]
    assert python == "python"
    assert host_path(worker, script) == ROOT / "docs" / "examples" / "report_worker.py"
    assert worker["healthcheck"] == {"disable": True}, "a worker serves no /healthz"
    redis_url = settings_from(environment(worker)).redis_url
    assert urlsplit(redis_url).hostname in compose["services"]


def test_compose_prometheus_scrapes_the_broker_with_our_config(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    (config_flag,) = (a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = host_path(prometheus, config_flag.split("=", 1)[1])
    assert config_path == PROMETHEUS_CONFIG.resolve()
    config = load_yaml(config_path)
    for rule_file in config["rule_files"]:
        assert (config_path.parent / rule_file).exists()
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] in ROUTES
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    broker = compose["services"]["cancel-broker"]
    port = Settings.resolve({}, {**dockerfile_env(final_stage(DOCKERFILE)), **environment(broker)})
    assert f"cancel-broker:{port.http_port}" in targets


def test_compose_grafana_provisions_prometheus_and_our_dashboard(
    compose: dict[str, Any],
) -> None:
    grafana = compose["services"]["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["isDefault"] is True
    assert urlsplit(datasource["url"]).hostname == "prometheus"
    (provider,) = load_yaml(provisioning / "dashboards" / "cancel-broker.yml")["providers"]
    folder = provider["options"]["path"]
    dashboards = [c for c in mounts(grafana) if PurePosixPath(folder) in PurePosixPath(c).parents]
    assert [host_path(grafana, c) for c in dashboards] == [
        (DEPLOY / "grafana" / "cancel-broker.json").resolve()
    ]
    dashboard = json.loads((DEPLOY / "grafana" / "cancel-broker.json").read_text())
    (variable,) = (v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert variable["query"] == datasource["type"]


# -- Kubernetes ------------------------------------------------------------------------------


def kustomize_resources() -> list[dict[str, Any]]:
    """The manifests kustomization.yaml lists (each file must exist), parsed by hand."""
    kustomization = load_yaml(K8S / "kustomization.yaml")
    documents = []
    for resource in kustomization["resources"]:
        path = K8S / resource
        assert path.is_file(), f"kustomization.yaml lists {resource}, which is missing"
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for labels in kustomization.get("labels", []):
        for doc in documents:
            doc["metadata"].setdefault("labels", {}).update(labels["pairs"])
    return documents


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    documents = kustomize_resources()
    return {doc["kind"]: doc for doc in documents}


def test_kustomize_builds_the_same_manifests(manifests: dict[str, dict[str, Any]]) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: kustomization.yaml was only parsed by hand")
    built = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    documents = [doc for doc in yaml.safe_load_all(built) if doc]
    assert sorted(doc["kind"] for doc in documents) == sorted(manifests)
    built_by_kind = {doc["kind"]: doc for doc in documents}
    # The image name is rewritten by kustomize, and the labels reach the pods' selector.
    (container,) = built_by_kind["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("cancel-broker:")
    service_selector = built_by_kind["Service"]["spec"]["selector"]
    pod_labels = built_by_kind["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service_selector.items() <= pod_labels.items()


def test_k8s_has_every_piece(manifests: dict[str, dict[str, Any]]) -> None:
    assert set(manifests) == {
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ServiceMonitor",
    }


def broker_container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = container
    return result


def k8s_environ(manifests: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The variables the broker container gets: the ConfigMap's, then its own ``env``
    (values from a Secret or the downward API stand in as placeholders)."""
    container = broker_container(manifests)
    (source,) = container["envFrom"]
    assert source["configMapRef"]["name"] == manifests["ConfigMap"]["metadata"]["name"]
    environ = {str(k): str(v) for k, v in manifests["ConfigMap"]["data"].items()}
    for item in container["env"]:
        environ[item["name"]] = item.get("value", "redis://from-a-secret:6379/0")
    return environ


def test_k8s_variables_are_settings(manifests: dict[str, dict[str, Any]]) -> None:
    settings = settings_from(k8s_environ(manifests))
    assert settings.http_host == "0.0.0.0"
    (redis,) = (e for e in broker_container(manifests)["env"] if e["name"].endswith("REDIS_URL"))
    assert "secretKeyRef" in redis["valueFrom"], "the URL carries a password: from a Secret"
    args = build_parser().parse_args(broker_container(manifests)["args"])
    assert args.command == "run"


def test_k8s_probes_hit_the_brokers_routes_on_its_port(
    manifests: dict[str, dict[str, Any]],
) -> None:
    container = broker_container(manifests)
    port = settings_from(k8s_environ(manifests)).http_port
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in named.values()
    probes = {kind: container[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    probes["startupProbe"] = container["startupProbe"]["httpGet"]
    for kind, probe in probes.items():
        assert probe["path"] in ROUTES, kind
        assert named.get(probe["port"], probe["port"]) == port, kind
    # Liveness must not fail while Redis is down (every broker would restart); readiness must.
    assert liveness_of(probes["livenessProbe"]["path"]) == 200
    assert liveness_of(probes["startupProbe"]["path"]) == 200
    assert liveness_of(probes["readinessProbe"]["path"]) == 503


def test_k8s_pod_is_non_root_and_bounded(manifests: dict[str, dict[str, Any]]) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid()
    container = broker_container(manifests)
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"requests", "limits"} <= set(container["resources"])
    assert "memory" in container["resources"]["limits"]
    # The broker stops within STOP_TIMEOUT_S of SIGTERM; the grace period must cover it.
    assert pod["terminationGracePeriodSeconds"] > STOP_TIMEOUT_S


def test_k8s_disruption_budget_keeps_a_broker(manifests: dict[str, dict[str, Any]]) -> None:
    deployment = manifests["Deployment"]
    pdb = manifests["PodDisruptionBudget"]["spec"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    assert 1 <= pdb["minAvailable"] < deployment["spec"]["replicas"]


def test_k8s_service_monitor_scrapes_metrics_as_the_alerts_expect(
    manifests: dict[str, dict[str, Any]],
) -> None:
    service = manifests["Service"]
    monitor = manifests["ServiceMonitor"]["spec"]
    container = broker_container(manifests)
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] == port["name"]
    assert endpoint["path"] in ROUTES
    # The operator names the job after the Service; the alerts select on the job name.
    (job,) = load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]
    assert service["metadata"]["name"] == job["job_name"]
    assert endpoint["path"] == job["metrics_path"]


# -- the routes themselves ----------------------------------------------------------------


class _NotReady:
    """A broker whose Redis is unreachable, as /readyz sees it."""

    async def readiness(self) -> tuple[bool, str]:
        return False, "Redis is unreachable"

    async def sync_state(self) -> SyncState:
        raise RuntimeError("Redis is unreachable")


def liveness_of(path: str) -> int:
    """The status ``path`` answers while the broker cannot reach Redis."""
    app = create_app(CollectorRegistry(), _NotReady())

    async def get() -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://broker") as web:
            return (await web.get(path)).status_code

    return anyio.run(get)


@pytest.mark.e2e
def test_every_probed_path_answers_on_a_live_broker(redis_url: str, namespace: str) -> None:
    container = broker_container({doc["kind"]: doc for doc in kustomize_resources()})
    paths = {container[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")}
    paths.add(load_yaml(PROMETHEUS_CONFIG)["scrape_configs"][0]["metrics_path"])
    broker, http = start_broker(redis_url, namespace)
    try:
        for path in sorted(paths):
            assert httpx.get(http + path, timeout=10).status_code == 200, path
    finally:
        assert broker.terminate() == 0


# -- the image itself ----------------------------------------------------------------------


def docker_daemon() -> str | None:
    """Why the image cannot be built here, or None if it can."""
    docker = shutil.which("docker")
    if docker is None:
        return "docker is not installed"
    info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        return f"no usable Docker daemon: {info.stderr.strip().splitlines()[-1:]}"
    return None


@pytest.mark.e2e
def test_image_builds_and_runs_as_non_root() -> None:
    reason = docker_daemon()
    if reason is not None:
        pytest.skip(f"IMAGE NOT BUILT: {reason}; deploy/Dockerfile was only parsed")
    tag = "cancel-broker:test"
    subprocess.run(
        ["docker", "build", "-f", str(DOCKERFILE), "-t", tag, str(ROOT)],
        check=True,
        timeout=900,
    )
    version = subprocess.run(
        ["docker", "run", "--rm", tag, "--version"], capture_output=True, text=True, timeout=120
    )
    assert version.returncode == 0, version.stderr
    uid = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert uid.stdout.strip() == str(image_uid())
