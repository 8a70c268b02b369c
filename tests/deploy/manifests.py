"""Reading the deploy files the way Docker Compose and kustomize would."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Mapping
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


_VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


class Interpolation:
    """Compose's variable substitution (``${VAR}``, ``${VAR:-default}``, ``${VAR:?message}``, ``$$``)."""

    def __init__(self, environment: Mapping[str, str]) -> None:
        self.environment = environment
        self.missing: dict[str, str] = {}
        """Required variables without a value, with their messages (Compose stops at the first)."""

    def value(self, text: str) -> str:
        def substitute(match: re.Match[str]) -> str:
            name, operator, argument = match.groups()
            is_set = name in self.environment
            value = self.environment.get(name, "")
            usable = bool(value) if operator and operator.startswith(":") else is_set
            if operator in (":-", "-"):
                return value if usable else argument
            if operator in (":?", "?"):
                if not usable:
                    self.missing[name] = argument
                return value
            return value

        return _VARIABLE.sub(substitute, text.replace("$$", "\0")).replace("\0", "$")

    def tree(self, node: Any) -> Any:
        if isinstance(node, str):
            return self.value(node)
        if isinstance(node, list):
            return [self.tree(item) for item in node]
        if isinstance(node, dict):
            return {key: self.tree(item) for key, item in node.items()}
        return node


def interpolated_compose(environment: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The Compose file as ``docker compose config`` would see it with ``environment`` (and the missing)."""
    interpolation = Interpolation(environment)
    data: dict[str, Any] = interpolation.tree(compose())
    return data, interpolation.missing


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
