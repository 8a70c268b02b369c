"""The deploy files are valid for their tools and give every service all it reads.

There is no Docker engine nor Kubernetes cluster here: Compose is checked against the Compose
specification's JSON schema, and kustomize's rendering of every kustomization against the Kubernetes
schemas, offline.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest

from tests.deploy.manifests import (
    BIN,
    COMPOSE,
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
