"""The deploy files are valid for their tools and give every service all it reads.

There is no Docker engine nor Kubernetes cluster here: Compose is checked against the Compose
specification's JSON schema, and kustomize's rendering of every kustomization against the Kubernetes
schemas, offline.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest

from tests.deploy.manifests import (
    BIN,
    COMPOSE,
    DEPLOY,
    KUSTOMIZATIONS,
    SERVICE_SETTINGS,
    compose,
    container_env,
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


def test_autoscalers_target_existing_workloads() -> None:
    docs = render(KUSTOMIZATIONS[0])
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for doc in docs:
        if doc["kind"] == "HorizontalPodAutoscaler":
            ref = doc["spec"]["scaleTargetRef"]
            assert (ref["kind"], ref["name"]) in names


def _defaults(value: str) -> str:
    """A Compose value with each ``${VAR:-default}`` replaced by its default (nothing set)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


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
    passwords = {k: _defaults(v) for k, v in init["environment"].items()}
    for service in ("api", "ingest", "sim"):
        url = urlsplit(_defaults(services[service]["environment"]["IOT_MQTT_URL"]))
        assert url.username == service
        assert url.password == passwords[f"MQTT_{service.upper()}_PASSWORD"]
    admin = urlsplit(_defaults(services["api"]["environment"]["IOT_MQTT_ADMIN_URL"]))
    assert (admin.username, admin.password) == ("admin", passwords["MQTT_ADMIN_PASSWORD"])
    assert _defaults(services["mosquitto"]["environment"]["MQTT_ADMIN_PASSWORD"]) == admin.password


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_api_and_ingest_pods_get_their_own_mqtt_users(kustomization: Path) -> None:
    docs = render(kustomization)
    workloads = workload_containers(docs)
    for service in ("api", "ingest"):
        env = container_env(docs, workloads[service][1])
        assert urlsplit(env["IOT_MQTT_URL"]).username == service
    assert "IOT_MQTT_ADMIN_URL" not in container_env(docs, workloads["ingest"][1])
