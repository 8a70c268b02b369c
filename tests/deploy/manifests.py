"""Reading the deploy files the way Docker Compose and kustomize would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import yaml

from iot_api.settings import ApiSettings
from iot_common.settings import BaseSettings, env_name
from iot_ingest.settings import IngestSettings
from iot_realtime.settings import RealtimeSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yml"
K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = [K8S / "base", *sorted((K8S / "overlays").iterdir())]
BIN = Path(sys.executable).parent

SERVICE_SETTINGS: dict[str, type[BaseSettings]] = {
    "api": ApiSettings,
    "realtime": RealtimeSettings,
    "ingest": IngestSettings,
    "migrate": BaseSettings,
}


def variables(settings: type[BaseSettings]) -> set[str]:
    """Every environment variable a settings type reads."""
    return {env_name(f.name) for f in msgspec.structs.fields(settings)}


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def render(kustomization: Path) -> list[dict[str, Any]]:
    """The manifests ``kubectl kustomize`` renders for one kustomization directory."""
    out = subprocess.run(
        [str(BIN / "kubectl"), "kustomize", str(kustomization)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def workload_containers(docs: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Container specs of Deployments, StatefulSets and Jobs, keyed by the service name ("api", ...)."""
    found = {}
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            container = doc["spec"]["template"]["spec"]["containers"][0]
            name = container["command"][0].removeprefix("iot-")
            found[name] = (doc, container)
    return found


def container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """What a container's environment would hold: envFrom ConfigMaps and Secrets, then env."""
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(by_name[("ConfigMap", source["configMapRef"]["name"])]["data"])
        if "secretRef" in source:
            env.update(by_name[("Secret", source["secretRef"]["name"])]["stringData"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "<from field>")
    return env
