"""deploy/ against the code: every file parses, and every name it uses (ports, routes, CLI flags, config
keys, environment overrides, metric names, labels, service names) is one the server really has."""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args, get_origin
from urllib.parse import urlsplit

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, TypeAdapter
from starlette.routing import Match

import mailslot.cli as cli
from mailslot.app import create_app
from mailslot.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
IMAGE_CONFIG = "/etc/mailslot/mailslot.toml"
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}


# -- helpers -----------------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def k8s_docs() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object in deploy/kubernetes by kind (one object of each kind)."""
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None or doc.get("kind") == "Kustomization":
                continue
            assert doc["kind"] not in docs, f"two {doc['kind']} objects"
            docs[doc["kind"]] = doc
    return docs


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(DEPLOY / "compose.yaml")
    return data


def node_services() -> dict[str, dict[str, Any]]:
    """The compose services built from deploy/Dockerfile: the Mailslot nodes."""
    return {
        name: svc for name, svc in compose()["services"].items()
        if isinstance(svc.get("build"), dict) and svc["build"].get("dockerfile") == "deploy/Dockerfile"
    }


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continuation"
    return instructions


def docker_values(keyword: str) -> list[str]:
    return [rest for key, rest in dockerfile() if key == keyword]


def exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(x, str) for x in parsed), value
    return parsed


def nginx_conf() -> str:
    return "\n".join(line.split("#", 1)[0] for line in (DEPLOY / "nginx.conf").read_text().splitlines())


def configmap_toml() -> dict[str, Any]:
    return tomllib.loads(k8s_docs()["ConfigMap"]["data"]["mailslot.toml"])


def toml_files(tmp_path: Path) -> dict[str, Path]:
    """Every configuration a container may run with, as files."""
    configmap = tmp_path / "configmap.toml"
    configmap.write_text(k8s_docs()["ConfigMap"]["data"]["mailslot.toml"])
    return {
        "cluster": DEPLOY / "mailslot.cluster.toml",
        "container": DEPLOY / "mailslot.container.toml",
        "configmap": configmap,
    }


def field_path(model: type[BaseModel], parts: list[str]) -> Any:
    """The annotation at ``parts`` under ``model`` (case-insensitive like the env source); fails if missing."""
    annotation: Any = model
    for part in parts:
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel), (
            f"{'.'.join(parts)}: {part!r} is below a value that is not a section"
        )
        fields = {name.lower(): f for name, f in annotation.model_fields.items()}
        fields.update({f.alias.lower(): f for f in annotation.model_fields.values() if f.alias})
        assert part.lower() in fields, f"{'.'.join(parts)}: no field {part!r} in {annotation.__name__}"
        annotation = fields[part.lower()].annotation
    return annotation


def check_toml_keys(data: dict[str, Any], model: type[BaseModel], where: str) -> None:
    """Every key of ``data`` is a field of ``model`` (Settings ignores unknown keys silently)."""
    for key, value in data.items():
        annotation = field_path(model, [key])
        if isinstance(value, dict) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
            check_toml_keys(value, annotation, f"{where}.{key}")
        elif isinstance(value, dict) and get_origin(annotation) is dict:
            item = get_args(annotation)[1]
            if isinstance(item, type) and issubclass(item, BaseModel):
                for name, sub in value.items():
                    check_toml_keys(sub, item, f"{where}.{key}.{name}")
        elif isinstance(value, list) and get_origin(annotation) is list:
            item = get_args(annotation)[0]
            if isinstance(item, type) and issubclass(item, BaseModel):
                for sub in value:
                    check_toml_keys(sub, item, f"{where}.{key}[]")


def env_overrides() -> dict[str, dict[str, str]]:
    """Every MAILSLOT_* variable that compose and Kubernetes set, by where it is set."""
    found: dict[str, dict[str, str]] = {}
    for name, svc in compose()["services"].items():
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        found[f"compose:{name}"] = {k: str(v) for k, v in env.items() if k.startswith("MAILSLOT_")}
    docs = k8s_docs()
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    found["k8s:Deployment"] = {e["name"]: str(e.get("value", "")) for e in container.get("env", [])
                               if e["name"].startswith("MAILSLOT_")}
    found["k8s:Secret"] = {k: str(v) for k, v in docs["Secret"]["stringData"].items()}
    return found


def url_path(url: str) -> str:
    return urlsplit(url).path


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: mailslot_* anywhere, and any name right before a selector."""
    names = set(re.findall(r"\b(mailslot_\w+)", expr))
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_matchers = re.sub(r"\{[^}]*\}", "{}", without_strings)
    names |= set(re.findall(r"([a-zA-Z_:][\w:]*)\s*\{", without_matchers))
    return names


def label_matchers(expr: str) -> Iterator[tuple[str, str, str]]:
    """(metric, label, value) of every ``metric{label op "value"}`` in ``expr``."""
    for metric, body in re.findall(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", expr):
        for label, value in re.findall(r'(\w+)\s*(?:=~|!~|!=|=)\s*"([^"]*)"', body):
            yield metric, label, value


# -- the server's side -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("deploy")
    settings = load_settings(storage={"url": f"sqlite:///{tmp}/mailslot.db", "data_dir": str(tmp)})
    with TestClient(create_app(settings)) as client:
        yield client


class Routes:
    """The app's routes: ``path in routes`` when a GET of ``path`` is matched by a route of the app."""

    def __init__(self, app: Any) -> None:
        self.routes = list(app.router.routes)

    def __contains__(self, path: object) -> bool:
        scope = {"type": "http", "path": path, "method": "GET", "root_path": "", "headers": [], "query_string": b""}
        return any(route.matches(scope)[0] == Match.FULL for route in self.routes)


@pytest.fixture(scope="module")
def routes(app_client: TestClient) -> Routes:
    found = Routes(app_client.app)
    assert "/health/nowhere" not in found
    return found


@pytest.fixture(scope="module")
def exported(app_client: TestClient) -> dict[str, set[str]]:
    """Sample name → label names, from GET /metrics after requests that touch every labelled metric."""
    assert app_client.get("/health/ready").status_code == 200  # sets mailslot_dependency_up
    assert app_client.get("/v1/keepalive").status_code == 200  # a request: mailslot_http_requests_total
    with app_client.websocket_connect("/v1/websocket/"):  # anonymous: mailslot_websocket_connections
        response = app_client.get("/metrics")
    assert response.status_code == 200
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


@functools.cache
def serve_flags() -> frozenset[str]:
    result = subprocess.run(
        [sys.executable, "-m", "mailslot", "serve", "--help"], capture_output=True, text=True, check=True,
        cwd=ROOT,
    )
    return frozenset(re.findall(r"(--[a-z][a-z-]*)", result.stdout)) - {"--help"}


def check_command(argv: list[str], monkeypatch: pytest.MonkeyPatch, flags: frozenset[str]) -> None:
    """``argv`` (after the ``mailslot`` entrypoint) uses real flags and starts `serve` with the deploy config."""
    assert argv[0] == "serve", argv
    used = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    assert used <= flags, f"unknown flags {used - flags} (mailslot serve has {flags})"
    assert argv[argv.index("--config") + 1] == IMAGE_CONFIG
    # Run the real CLI on it (with the config path pointed at the repository's file, and without
    # starting the server): argparse refuses unknown arguments and load_settings refuses a bad file.
    started: list[Settings] = []

    def fake_run(coro: Any) -> None:
        started.append(coro.cr_frame.f_locals["settings"])
        coro.close()

    monkeypatch.setattr(cli, "_run", fake_run)
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)
    local = [str(DEPLOY / "mailslot.container.toml") if a == IMAGE_CONFIG else a for a in argv]
    assert cli.main(local) == 0
    assert len(started) == 1 and started[0].server.host == "0.0.0.0"


# -- Dockerfile ----------------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    froms = docker_values("FROM")
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    for value in froms:
        assert value.split()[0].startswith("python:3.11-slim"), value
    stages = [value.split()[2] for value in froms if len(value.split()) >= 3 and value.split()[1].upper() == "AS"]
    runtime = " ".join(rest for key, rest in dockerfile() if key in ("COPY", "RUN"))
    assert any(f"from={stage}" in runtime.lower() for stage in stages), "the runtime stage uses the build stage"
    assert "pip wheel" in runtime and "--no-index" in runtime, "a wheel is built, then installed offline"
    users = docker_values("USER")
    assert users, "USER is set"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0")
    assert uid.isdigit(), "a numeric USER lets Kubernetes check runAsNonRoot"


def test_dockerfile_copies_what_exists_and_is_not_ignored() -> None:
    ignored = [
        line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for value in docker_values("COPY"):
        parts = [p for p in value.split() if not p.startswith("--")]
        if any(p.startswith("--from") for p in value.split()):
            continue
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            for pattern in ignored:
                assert not (source == pattern or source.startswith(pattern + "/")), f"{source} is dockerignored"


def test_dockerfile_port_healthcheck_and_command(
    routes: Routes, monkeypatch: pytest.MonkeyPatch
) -> None:
    exposed = {int(p.split("/")[0]) for value in docker_values("EXPOSE") for p in value.split()}
    container = tomllib.loads((DEPLOY / "mailslot.container.toml").read_text())
    assert exposed == {container["server"]["port"]}
    assert container["server"]["host"] == "0.0.0.0"
    copies = [value.split() for value in docker_values("COPY")]
    assert ["deploy/mailslot.container.toml", IMAGE_CONFIG] in copies

    (health,) = docker_values("HEALTHCHECK")
    urls = re.findall(r"https?://[^'\" ]+", health)
    assert urls and all(url_path(u) == "/health/live" for u in urls)
    assert all(urlsplit(u).port == container["server"]["port"] for u in urls)
    assert "/health/live" in routes

    (entrypoint,) = docker_values("ENTRYPOINT")
    (cmd,) = docker_values("CMD")
    argv = exec_form(entrypoint) + exec_form(cmd)
    assert argv[0] == "mailslot"
    check_command(argv[1:], monkeypatch, serve_flags())


# -- configuration -------------------------------------------------------------------------------------


def test_config_files_use_real_keys_and_load(tmp_path: Path) -> None:
    for name, path in toml_files(tmp_path).items():
        data = tomllib.loads(path.read_text())
        check_toml_keys(data, Settings, name)
        settings = load_settings(path)
        assert settings.server.host == "0.0.0.0", name
        assert settings.server.port == 8080, name


def test_cluster_config_shares_what_nodes_must_share() -> None:
    settings = load_settings(DEPLOY / "mailslot.cluster.toml")
    assert settings.storage.url.startswith("postgresql://")
    assert settings.cluster.redis_url.startswith("redis://")
    assert settings.auth.jwt_secret and settings.auth.link_secret
    assert settings.delivery.at_rest_keys
    assert settings.sealed_sender.trust_root and settings.sealed_sender.server_keys
    assert settings.media.upload_secret and settings.media.avatar_secret_key
    text = (DEPLOY / "mailslot.cluster.toml").read_text()
    assert "mailslot certificate create-root" in text and "mailslot certificate create-server" in text
    for secret in (settings.auth.jwt_secret, settings.auth.link_secret, settings.sealed_sender.trust_root,
                   *settings.delivery.at_rest_keys.values()):
        assert "REPLACE-ME" in secret, "shipped secrets are clearly placeholders"


def test_env_overrides_name_real_fields_and_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = env_overrides()
    assert overrides["k8s:Secret"], "the Secret carries the shared secrets"
    for where, env in overrides.items():
        for name in env:
            assert name.startswith("MAILSLOT_") and "__" in name, f"{where}: {name}"
            field_path(Settings, name.removeprefix("MAILSLOT_").split("__"))
    # The Kubernetes pod's environment on top of its ConfigMap: every value lands where it is meant to.
    env = {**overrides["k8s:Deployment"], **overrides["k8s:Secret"]}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(toml_files(tmp_path)["configmap"])
    for name, value in env.items():
        parts = name.removeprefix("MAILSLOT_").lower().split("__")
        annotation = field_path(Settings, parts)
        current: Any = settings
        for part in parts:
            current = getattr(current, part if part != "schema" else "schema_name")
        if annotation is str:
            assert current == value, name
        else:
            assert TypeAdapter(annotation).dump_python(current, mode="json") == json.loads(value), name


def test_compose_connection_strings_match_its_services() -> None:
    settings = load_settings(DEPLOY / "mailslot.cluster.toml")
    services = compose()["services"]
    db = urlsplit(settings.storage.url)
    assert db.hostname in services and db.port in (None, 5432)
    pg_env = services[db.hostname]["environment"]
    assert db.username == pg_env["POSTGRES_USER"]
    assert db.password == pg_env["POSTGRES_PASSWORD"]
    assert db.path.lstrip("/") == pg_env["POSTGRES_DB"]
    assert urlsplit(settings.cluster.redis_url).hostname in services


# -- compose ---------------------------------------------------------------------------------------------


def test_compose_runs_three_nodes_of_one_image(monkeypatch: pytest.MonkeyPatch, routes: Routes) -> None:
    nodes = node_services()
    assert len(nodes) == 3
    images = {svc["image"] for svc in nodes.values()}
    assert len(images) == 1
    node_ids = {svc["environment"]["MAILSLOT_CLUSTER__NODE_ID"] for svc in nodes.values()}
    assert len(node_ids) == 3, "each node names itself differently"
    flags = serve_flags()
    for svc in nodes.values():
        assert svc["build"]["context"] == ".."
        assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        assert mounts[IMAGE_CONFIG] == "./mailslot.cluster.toml"
        assert [str(p) for p in svc.get("expose", [])] == ["8080"]
        check_command(list(svc["command"]), monkeypatch, flags)
        test = " ".join(svc["healthcheck"]["test"])
        (url,) = re.findall(r"https?://[^'\" ]+", test)
        assert url_path(url) in routes and urlsplit(url).port == 8080


def test_compose_dependencies_wait_for_health() -> None:
    services = compose()["services"]
    nodes = node_services()
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no healthcheck for {name} to wait for"
    for svc in nodes.values():
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    lb = services["lb"]
    for node in nodes:
        assert lb["depends_on"][node]["condition"] == "service_healthy"


def test_load_balancer_is_the_trusted_proxy() -> None:
    data = compose()
    lb_address = data["services"]["lb"]["networks"]["mailslot"]["ipv4_address"]
    subnet = data["networks"]["mailslot"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(lb_address) in ipaddress.ip_network(subnet)
    trusted = load_settings(DEPLOY / "mailslot.cluster.toml").server.trusted_proxies
    assert any(ipaddress.ip_address(lb_address) in ipaddress.ip_network(t, strict=False) for t in trusted)
    mounted = [v.split(":")[0] for v in data["services"]["lb"]["volumes"]]
    assert "./nginx.conf" in mounted


def test_nginx_forwards_websockets_to_the_nodes() -> None:
    conf = nginx_conf()
    (upstream_name, body) = re.search(r"upstream\s+(\w+)\s*\{(.*?)\}", conf, re.S).groups()  # type: ignore[union-attr]
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", body, re.M)
    assert {host for host, _ in servers} == set(node_services())
    assert {int(port) for _, port in servers} == {8080}
    assert re.search(rf"proxy_pass\s+http://{upstream_name}\s*;", conf)
    assert re.search(r"proxy_http_version\s+1\.1\s*;", conf)
    assert re.search(r"proxy_set_header\s+Upgrade\s+\$http_upgrade\s*;", conf)
    connection = re.search(r"proxy_set_header\s+Connection\s+(\S+)\s*;", conf)
    assert connection is not None
    if connection.group(1) != '"upgrade"':
        variable = connection.group(1)
        assert re.search(rf"map\s+\$http_upgrade\s+{re.escape(variable)}\s*\{{[^}}]*default\s+upgrade\s*;", conf)
    assert re.search(r"proxy_set_header\s+X-Forwarded-For\s+\$proxy_add_x_forwarded_for\s*;", conf)
    timeout = re.search(r"proxy_read_timeout\s+(\d+)s?\s*;", conf)
    assert timeout is not None
    idle = load_settings(DEPLOY / "mailslot.cluster.toml").websocket.idle_timeout_seconds
    assert int(timeout.group(1)) > idle, "the balancer must not cut sockets the server keeps open"
    (listen,) = re.findall(r"listen\s+(\d+)\s*;", conf)
    published = [p.split(":") for p in compose()["services"]["lb"]["ports"]]
    assert any(container == listen for _, container in published)


# -- Kubernetes ------------------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_k8s_deployment(routes: Routes, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = k8s_docs()
    deployment = docs["Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]

    assert container["image"] == next(iter(node_services().values()))["image"], "one image in compose and k8s"
    check_command(container["args"], monkeypatch, serve_flags())
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080}
    assert configmap_toml()["server"]["port"] == 8080

    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in routes, f"{probe}: {get['path']} is not a route"
        assert get["port"] in ports or get["port"] in ports.values()

    assert pod["securityContext"]["runAsNonRoot"] is True
    uid = docker_values("USER")[-1].split(":")[0]
    assert str(pod["securityContext"]["runAsUser"]) == uid
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]

    # preStop sleeps while the endpoint is removed; then SIGTERM and uvicorn's graceful shutdown.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    sleep = int(pre_stop[1])
    graceful = re.search(r"timeout_graceful_shutdown=(\d+)", Path(cli.__file__).read_text())
    assert graceful is not None
    assert pod["terminationGracePeriodSeconds"] > sleep + int(graceful.group(1))

    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_volume = next(name for name, path in mounts.items() if path == str(Path(IMAGE_CONFIG).parent))
    assert volumes[config_volume]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert Path(IMAGE_CONFIG).name in docs["ConfigMap"]["data"]
    data_dir = configmap_toml()["storage"]["data_dir"]
    assert data_dir in mounts.values(), "data_dir is writable (the root filesystem is read-only)"
    (secret_ref,) = container["envFrom"]
    assert secret_ref["secretRef"]["name"] == docs["Secret"]["metadata"]["name"]
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in routes
    assert int(annotations["prometheus.io/port"]) == 8080


def test_k8s_selectors_match_the_pods() -> None:
    docs = k8s_docs()
    deployment = docs["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]

    service = docs["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    port_names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names

    pdb = docs["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]

    hpa = docs["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    pool = configmap_toml()["storage"]["pool_size"]
    assert hpa["spec"]["maxReplicas"] * pool < 200, "PostgreSQL connections at maxReplicas stay reasonable"

    monitor = docs["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics"
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "mailslot", 'job="mailslot" in alerts'

    ingress = docs["Ingress"]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"] and backend["port"]["name"] in service_ports


# -- Prometheus and Grafana ------------------------------------------------------------------------------


def check_expr(expr: str, exported: dict[str, set[str]], where: str) -> set[str]:
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    for name in names:
        assert name == "up" or name in exported, f"{where}: {name} is not exported by the server"
    for metric, label, value in label_matchers(expr):
        if metric == "up":
            continue
        assert label in exported[metric] | TARGET_LABELS, f"{where}: {metric} has no label {label!r}"
        if label == "path" and metric.startswith("mailslot_delivery_seconds"):
            from mailslot.observability.metrics import DELIVERY_PATHS

            assert value in DELIVERY_PATHS
    return names


def test_alerts_use_exported_metrics(exported: dict[str, set[str]]) -> None:
    rules = [rule for group in load_yaml(DEPLOY / "prometheus" / "alerts.yaml")["groups"] for rule in group["rules"]]
    used: set[str] = set()
    exprs: dict[str, str] = {}
    for rule in rules:
        assert {"alert", "expr", "labels", "annotations"} <= rule.keys(), rule
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"]
        used |= check_expr(rule["expr"], exported, rule["alert"])
        exprs[rule["alert"]] = " ".join(rule["expr"].split())
    assert len(exprs) == len(rules), "alert names are unique"
    joined = list(exprs.values())
    assert any(re.search(r'\bup\{job="mailslot"\}\s*==\s*0', e) for e in joined), "node down"
    assert any("mailslot_http_requests_total" in e and 'status=~"5.."' in e for e in joined), "5xx rate"
    assert any("histogram_quantile(0.99" in e and "mailslot_delivery_seconds_bucket" in e for e in joined)
    assert any("mailslot_messages_stored_total" in e and "mailslot_delivery_seconds_count" in e for e in joined)
    assert any('mailslot_dependency_up{dependency="redis"}' in e and "== 0" in e for e in joined)
    assert any('mailslot_dependency_up{dependency=~"storage' in e and "== 0" in e for e in joined)


def test_prometheus_scrapes_the_nodes(routes: Routes) -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "mailslot"
    assert job["metrics_path"] in routes
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{name}:8080" for name in node_services()}
    assert "/etc/prometheus/alerts.yaml" in config["rule_files"]
    mounts = [v.split(":")[:2] for v in compose()["services"]["prometheus"]["volumes"]]
    assert ["./prometheus/alerts.yaml", "/etc/prometheus/alerts.yaml"] in mounts


def test_dashboard_uses_exported_metrics(exported: dict[str, set[str]]) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "mailslot-dashboard.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    used: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used |= check_expr(target["expr"], exported, panel["title"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            check_expr(variable["definition"].replace("label_values(", "").split(",")[0] + "{}", exported,
                       variable["name"])
    for wanted in ("mailslot_http_requests_total", "mailslot_http_request_seconds_bucket",
                   "mailslot_websocket_connections", "mailslot_delivery_seconds_bucket",
                   "mailslot_dependency_up", "mailslot_messages_stored_total"):
        assert wanted in used, f"the dashboard shows no {wanted}"
    provisioning = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    (source,) = provisioning["datasources"]
    datasource_var = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert datasource_var["current"]["value"] == source["uid"]


def test_every_deploy_file_parses() -> None:
    for path in DEPLOY.rglob("*"):
        if path.suffix in (".yaml", ".yml"):
            assert list(yaml.safe_load_all(path.read_text())), path
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".toml":
            tomllib.loads(path.read_text())
    assert dockerfile()
    assert shlex.split(nginx_conf()) and nginx_conf().count("{") == nginx_conf().count("}")
