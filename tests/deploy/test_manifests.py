"""The deploy files are valid for their tools and give every service all it reads.

There is no Docker engine nor Kubernetes cluster here: Compose is checked against the Compose
specification's JSON schema, and kustomize's rendering of every kustomization against the Kubernetes
schemas, offline.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest

from iot_api.settings import ApiSettings
from iot_common.settings import SettingsError, load_settings
from iot_common.startup import PROBE_TIMEOUT_S
from iot_realtime.settings import RealtimeSettings
from tests.deploy.manifests import (
    BIN,
    COMPOSE,
    DEPLOY,
    KUSTOMIZATIONS,
    SERVICE_SETTINGS,
    compose,
    container_env,
    interpolated_compose,
    render,
    variables,
    workload_containers,
)

K8S_VERSION = "1.31"


def test_compose_file_follows_the_compose_specification() -> None:
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("service", sorted(SERVICE_SETTINGS))
def test_compose_sets_every_variable_the_service_reads(service: str) -> None:
    env = compose()["services"][service]["environment"]
    missing = variables(SERVICE_SETTINGS[service]) - set(env)
    assert not missing, f"compose service {service} lacks {sorted(missing)}"


@pytest.mark.parametrize("service", ["api", "realtime", "ingest"])
def test_compose_healthchecks_use_the_service_port_and_health_path(service: str) -> None:
    spec = compose()["services"][service]
    check = " ".join(spec["healthcheck"]["test"])
    url = urlsplit(check[check.index("http://") :].split("'")[0])
    port_var = {"api": "IOT_API_PORT", "realtime": "IOT_REALTIME_PORT", "ingest": "IOT_INGEST_HTTP_PORT"}
    assert str(url.port) == spec["environment"][port_var[service]]
    assert url.path in ("/healthz", "/readyz")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_rendered_manifests_follow_the_kubernetes_schemas(kustomization: Path) -> None:
    docs = render(kustomization)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Secret", "Job"} <= kinds
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "Ingress"} <= kinds
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_every_workload_gets_every_variable_it_reads(kustomization: Path) -> None:
    docs = render(kustomization)
    workloads = workload_containers(docs)
    assert set(workloads) == set(SERVICE_SETTINGS)
    for service, (_, container) in workloads.items():
        missing = variables(SERVICE_SETTINGS[service]) - set(container_env(docs, container))
        assert not missing, f"{kustomization.name}: {service} lacks {sorted(missing)}"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_workloads_run_as_non_root_with_probes_on_their_port(kustomization: Path) -> None:
    docs = render(kustomization)
    for service, (doc, container) in workload_containers(docs).items():
        pod: dict[str, Any] = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert "limits" in container["resources"]
        assert "requests" in container["resources"]
        if doc["kind"] == "Job":
            continue
        env = container_env(docs, container)
        port = int(container["ports"][0]["containerPort"])
        port_var = {"api": "IOT_API_PORT", "realtime": "IOT_REALTIME_PORT", "ingest": "IOT_INGEST_HTTP_PORT"}
        assert int(env[port_var[service]]) == port
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert pod["terminationGracePeriodSeconds"] >= 30


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_liveness_is_held_back_while_a_service_waits_for_its_backends(kustomization: Path) -> None:
    docs = render(kustomization)
    for service, (doc, container) in workload_containers(docs).items():
        wait = float(container_env(docs, container)["IOT_STARTUP_WAIT_S"])
        assert wait > 0, f"{service}: a pod that starts before its backends would crash-loop at once"
        if doc["kind"] == "Job":
            continue
        probe = container["startupProbe"]
        assert probe["httpGet"]["path"] == "/healthz"
        # The wait, one more attempt per backend, and the time to start listening.
        needed = wait + 3 * PROBE_TIMEOUT_S + 20
        budget = probe["periodSeconds"] * probe["failureThreshold"]
        assert budget >= needed, f"{service}: the startupProbe gives {budget} s, start-up may take {needed} s"


def test_autoscalers_target_existing_workloads() -> None:
    docs = render(KUSTOMIZATIONS[0])
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for doc in docs:
        if doc["kind"] == "HorizontalPodAutoscaler":
            ref = doc["spec"]["scaleTargetRef"]
            assert (ref["kind"], ref["name"]) in names


REQUIRED_SECRETS = {
    "IOT_JWT_SECRET",
    "IOT_BOOTSTRAP_ADMIN_PASSWORD",
    "IOT_POSTGRES_PASSWORD",
    "IOT_MQTT_ADMIN_PASSWORD",
    "IOT_MQTT_INGEST_PASSWORD",
    "IOT_MQTT_API_PASSWORD",
}
"""What ``docker compose up`` must refuse to run without (docs/deploy.md)."""
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY\b")


def random_secrets() -> dict[str, str]:
    """A value for every secret the Compose file reads, as ``make compose-env`` writes them."""
    return {name: secrets.token_urlsafe(32) for name in (*REQUIRED_SECRETS, "IOT_MQTT_SIM_PASSWORD")}


def test_compose_refuses_to_start_without_each_secret_and_has_no_default_for_any() -> None:
    _, missing = interpolated_compose({})
    assert set(missing) == REQUIRED_SECRETS
    assert all("docs/deploy.md" in message for message in missing.values()), missing
    text = COMPOSE.read_text()
    for name, default in re.findall(r"\$\{(\w+):?-([^}]*)\}", text):
        if SECRET_NAME.search(name):
            assert default == "", f"${{{name}}} falls back to {default!r}"
    # Set, but empty, is missing too.
    _, missing = interpolated_compose(dict.fromkeys(REQUIRED_SECRETS, ""))
    assert set(missing) == REQUIRED_SECRETS


def test_compose_with_the_secrets_set_gives_the_web_services_valid_settings() -> None:
    given = random_secrets()
    services, missing = interpolated_compose(given)
    assert not missing
    api = load_settings(ApiSettings, services["services"]["api"]["environment"])
    realtime = load_settings(RealtimeSettings, services["services"]["realtime"]["environment"])
    assert api.jwt_secret == realtime.jwt_secret == given["IOT_JWT_SECRET"]
    assert api.bootstrap_admin_password == given["IOT_BOOTSTRAP_ADMIN_PASSWORD"]
    postgres = services["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert urlsplit(api.database_url).password == postgres == given["IOT_POSTGRES_PASSWORD"]


def test_every_port_compose_publishes_is_bound_to_the_loopback_interface() -> None:
    published = 0
    for name, spec in interpolated_compose(random_secrets())[0]["services"].items():
        for port in spec.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                host_ip, _, _ = str(port).rpartition(":")[0].rpartition(":")
                assert host_ip == "127.0.0.1", f"{name} publishes {port!r} on every interface"
    assert published >= 4


PUBLISHED_PORTS = {
    "api": ("IOT_API_PUBLISHED_PORT", 8000),
    "realtime": ("IOT_REALTIME_PUBLISHED_PORT", 8001),
    "ingest": ("IOT_INGEST_PUBLISHED_PORT", 8002),
    "mosquitto": ("IOT_MQTT_PUBLISHED_PORT", 1883),
}


def test_the_published_host_ports_default_to_the_service_ports_and_can_be_moved() -> None:
    def host_ports(environment: dict[str, str]) -> dict[str, str]:
        services = interpolated_compose(environment)[0]["services"]
        return {name: str(services[name]["ports"][0]).split(":")[1] for name in PUBLISHED_PORTS}

    defaults = {name: str(port) for name, (_, port) in PUBLISHED_PORTS.items()}
    assert host_ports(random_secrets()) == defaults
    moved = {name: str(20000 + port) for name, (_, port) in PUBLISHED_PORTS.items()}
    given = {variable: moved[name] for name, (variable, _) in PUBLISHED_PORTS.items()}
    assert host_ports({**random_secrets(), **given}) == moved


def test_compose_v1_accepts_the_file() -> None:
    # Compose v1 (docker-compose 1.29, Debian's) refuses a top-level `name:`: the Makefile passes -p.
    assert set(compose()) <= {"services", "volumes", "networks", "configs", "secrets"} | {
        key for key in compose() if key.startswith("x-")
    }
    v1 = Path("/usr/bin/docker-compose")
    if not v1.exists():
        pytest.skip("docker-compose (v1) is not installed; tests/image runs it")
    result = subprocess.run(
        [str(v1), "-p", "iot-platform", "-f", str(COMPOSE), "config", "-q"],
        env={"PATH": "/usr/bin:/bin", **random_secrets()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_sim_broker_user_exists_only_under_the_sim_profile() -> None:
    services = compose()["services"]
    init = services["mosquitto-init"]
    assert "MQTT_SIM_PASSWORD" not in init["environment"], "the default broker users include sim"
    scripts = {
        name: spec["command"][-1]
        for name, spec in services.items()
        if any("dynsec-sim.sh" in part for part in spec.get("command", []))
    }
    assert sorted(scripts.values()) == ["add", "remove"]
    adder = next(name for name, action in scripts.items() if action == "add")
    remover = next(name for name, action in scripts.items() if action == "remove")
    assert services[adder]["profiles"] == ["sim"]
    assert "profiles" not in services[remover], "the removal runs on every `up`"
    assert services[adder]["depends_on"][remover]["condition"] == "service_completed_successfully"
    assert services["sim"]["profiles"] == ["sim"]
    assert services["sim"]["depends_on"][adder]["condition"] == "service_completed_successfully"
    for name, spec in services.items():
        if "IOT_MQTT_SIM_PASSWORD" in str(spec.get("environment", {})):
            assert spec.get("profiles") == ["sim"], f"{name} reads the sim password outside the profile"


def test_shipped_broker_refuses_anonymous_clients_and_loads_dynamic_security() -> None:
    lines = [
        line.split()
        for line in (DEPLOY / "mosquitto/mosquitto.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    settings = {words[0]: words[1:] for words in lines}
    assert settings["allow_anonymous"] == ["false"]
    assert settings["plugin"][0].endswith("mosquitto_dynamic_security.so")
    assert settings["plugin_opt_config_file"][0].startswith("/mosquitto/data/")
    assert int(settings["max_queued_messages"][0]) > 0, "0 makes Mosquitto 2.0.11 drop denied publishers"


def test_compose_services_connect_as_the_users_the_broker_is_initialised_with() -> None:
    services = compose()["services"]
    init = services["mosquitto-init"]
    assert init["volumes"][0].startswith("./mosquitto/dynsec-init.sh:")
    assert services["mosquitto"]["depends_on"]["mosquitto-init"]["condition"] == (
        "service_completed_successfully"
    )
    services = interpolated_compose(random_secrets())[0]["services"]
    passwords = {
        **services["mosquitto-init"]["environment"],
        **services["mosquitto-sim-on"]["environment"],
    }
    for service in ("api", "ingest", "sim"):
        url = urlsplit(services[service]["environment"]["IOT_MQTT_URL"])
        assert url.username == service
        assert url.password == passwords[f"MQTT_{service.upper()}_PASSWORD"]
    admin = urlsplit(services["api"]["environment"]["IOT_MQTT_ADMIN_URL"])
    assert (admin.username, admin.password) == ("admin", passwords["MQTT_ADMIN_PASSWORD"])
    for name in ("mosquitto", "mosquitto-sim-off", "mosquitto-sim-on"):
        assert services[name]["environment"]["MQTT_ADMIN_PASSWORD"] == admin.password


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_api_and_ingest_pods_get_their_own_mqtt_users(kustomization: Path) -> None:
    docs = render(kustomization)
    workloads = workload_containers(docs)
    for service in ("api", "ingest"):
        env = container_env(docs, workloads[service][1])
        assert urlsplit(env["IOT_MQTT_URL"]).username == service
    assert "IOT_MQTT_ADMIN_URL" not in container_env(docs, workloads["ingest"][1])


def _route(ingress: dict[str, Any], path: str) -> str | None:
    """The Service an Ingress sends ``path`` to, by the Kubernetes rules (None: not routed).

    ``Exact`` matches the path as is; ``Prefix`` matches whole ``/``-separated elements (``/api/v1``
    matches ``/api/v1/devices``, not ``/api/v10``); the longest match wins, ``Exact`` before ``Prefix``.
    """
    candidates: list[tuple[int, int, str]] = []
    parts = [p for p in path.split("/") if p]
    for rule in ingress["spec"]["rules"]:
        for item in rule["http"]["paths"]:
            kind, rule_path = item["pathType"], item["path"]
            service: str = item["backend"]["service"]["name"]
            rule_parts = [p for p in rule_path.split("/") if p]
            if kind == "Exact" and path == rule_path:
                candidates.append((len(rule_path), 1, service))
            elif kind == "Prefix" and parts[: len(rule_parts)] == rule_parts:
                candidates.append((len(rule_path), 0, service))
    return max(candidates)[2] if candidates else None


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_the_ingress_routes_only_the_api_the_websocket_the_dashboard_and_device_ingest(
    kustomization: Path,
) -> None:
    from iot_api.app import OPENAPI_PATH

    ingresses = [doc for doc in render(kustomization) if doc["kind"] == "Ingress"]
    assert len(ingresses) == 1
    ingress = ingresses[0]
    assert "defaultBackend" not in ingress["spec"]
    kinds = {item["pathType"] for rule in ingress["spec"]["rules"] for item in rule["http"]["paths"]}
    assert kinds <= {"Exact", "Prefix"}, "ImplementationSpecific paths depend on the controller"
    public = {
        "/api/v1/devices": "iot-api",
        "/api/v1/auth/login": "iot-api",
        "/api/v1": "iot-api",
        "/ws": "iot-realtime",
        "/dashboard": "iot-api",
        "/dashboard/": "iot-api",
        "/dashboard/assets/index.js": "iot-api",
        "/ingest/v1/devices/boiler-1/telemetry": "iot-ingest-http",
    }
    internal = [
        "/metrics",
        "/healthz",
        "/readyz",
        OPENAPI_PATH,
        f"{OPENAPI_PATH}/openapi.json",
        f"{OPENAPI_PATH}/swagger",
        "/api",
        "/api/v10",
        "/ws/other",
        "/wsx",
        "/dashboardx",
        "/ingest",
        "/ingest/v10/devices/x/telemetry",
        "/",
    ]
    for path, service in public.items():
        assert _route(ingress, path) == service, path
    for path in internal:
        assert _route(ingress, path) is None, f"{path} is routed publicly"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_the_k8s_secret_placeholders_stop_the_web_services(kustomization: Path) -> None:
    docs = render(kustomization)
    workloads = workload_containers(docs)
    for service, settings in (("api", ApiSettings), ("realtime", RealtimeSettings)):
        env = container_env(docs, workloads[service][1])
        with pytest.raises(SettingsError) as err:
            load_settings(settings, env)
        assert str(err.value).startswith("invalid configuration: IOT_JWT_SECRET ")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_behind_the_ingress_each_client_keeps_its_own_address(kustomization: Path) -> None:
    """The API trusts the X-Forwarded-For of the Ingress controller's pods (typical pod networks), and no
    public address: otherwise every client shares one address and one attacker locks out everyone."""
    docs = render(kustomization)
    _, container = workload_containers(docs)["api"]
    env = {
        "IOT_JWT_SECRET": secrets.token_urlsafe(48),
        "IOT_TRUSTED_PROXIES": container_env(docs, container)["IOT_TRUSTED_PROXIES"],
    }
    trusted = [ipaddress.ip_network(n) for n in load_settings(ApiSettings, env).trusted_proxies]
    for pod in ("10.244.1.7", "10.42.0.12", "172.17.0.3", "100.96.2.4"):
        assert any(ipaddress.ip_address(pod) in net for net in trusted), pod
    for public in ("8.8.8.8", "203.0.113.9", "2001:db8::1"):
        assert not any(ipaddress.ip_address(public) in net for net in trusted), public


def test_under_compose_the_dashboard_connects_to_the_published_realtime_port() -> None:
    services = interpolated_compose(random_secrets())[0]["services"]
    api = load_settings(ApiSettings, services["api"]["environment"])
    url = urlsplit(api.realtime_url() or "")
    host_ip, host_port, container_port = str(services["realtime"]["ports"][0]).split(":")
    assert (url.scheme, url.hostname, url.port, url.path) == ("ws", host_ip, int(host_port), "/ws")
    assert container_port == services["realtime"]["environment"]["IOT_REALTIME_PORT"]
    # The deployment's own address wins (behind a TLS proxy).
    given = {**random_secrets(), "IOT_PUBLIC_REALTIME_URL": "wss://iot.example.com/ws"}
    api = load_settings(ApiSettings, interpolated_compose(given)[0]["services"]["api"]["environment"])
    assert api.realtime_url() == "wss://iot.example.com/ws"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_the_dashboard_finds_the_realtime_service_where_it_is_served(kustomization: Path) -> None:
    """Base: behind the Ingress, ``/ws`` on the dashboard's own host, routed to the realtime Service, which
    accepts the WebSockets of that host's pages. Otherwise (dev, by port-forward) the realtime port."""
    docs = render(kustomization)
    workloads = workload_containers(docs)
    secret = {"IOT_JWT_SECRET": secrets.token_urlsafe(48)}  # the Secret holds placeholders
    public_url = container_env(docs, workloads["api"][1])["IOT_PUBLIC_REALTIME_URL"]
    url = load_settings(ApiSettings, {**secret, "IOT_PUBLIC_REALTIME_URL": public_url}).realtime_url()
    assert url is not None, "the dashboard would guess <host>:8001"
    cors = container_env(docs, workloads["realtime"][1])["IOT_CORS_ORIGINS"]
    origins = load_settings(RealtimeSettings, {**secret, "IOT_CORS_ORIGINS": cors}).cors_origins
    if url.startswith("/"):
        ingress = next(doc for doc in docs if doc["kind"] == "Ingress")
        assert _route(ingress, url) == "iot-realtime"
        assert _route(ingress, "/dashboard/") == "iot-api"
        for rule in ingress["spec"]["rules"]:
            assert f"https://{rule['host']}" in origins, "the realtime service would refuse the dashboard"
    else:
        assert urlsplit(url).port == int(workloads["realtime"][1]["ports"][0]["containerPort"])
        assert "http://127.0.0.1:8000" in origins
