"""The platform's broker roles: the same rights on Mosquitto (deploy/mosquitto/dynsec-init.sh) and on EMQX
(``iot_api.services.mqtt_acl.SERVICE_ROLES``), and the rights each service needs for what it does."""

from __future__ import annotations

import shlex
from pathlib import Path

from iot_api.services.mqtt_acl import SERVICE_ROLES, allowed
from iot_common.topics import COMMAND_ACK_FILTER, STATUS_FILTER, TELEMETRY_FILTER, shared_subscription

ROOT = Path(__file__).resolve().parents[2]
ACTIONS = {"subscribePattern": "subscribe", "publishClientSend": "publish"}


def dynsec_roles() -> dict[str, set[tuple[str, str]]]:
    """``service_user NAME PASSWORD ACLTYPE TOPIC ...`` calls of the shipped init script, as rules."""
    text = (ROOT / "deploy/mosquitto/dynsec-init.sh").read_text().replace("\\\n", " ")
    roles: dict[str, set[tuple[str, str]]] = {}
    for line in text.splitlines():
        if not line.strip().startswith("service_user "):
            continue
        words = shlex.split(line)
        pairs = words[3:]
        roles[words[1]] = {
            (ACTIONS[kind], topic)
            for kind, topic in zip(pairs[::2], pairs[1::2], strict=True)
            if kind in ACTIONS
        }
    return roles


def test_mosquitto_and_emqx_give_the_services_the_same_rights() -> None:
    roles = dynsec_roles()
    assert set(roles) == set(SERVICE_ROLES)
    for name, rules in SERVICE_ROLES.items():
        assert roles[name] == set(rules), name


def test_ingest_may_subscribe_to_what_it_reads_and_publish_commands() -> None:
    ingest = SERVICE_ROLES["ingest"]
    for topic_filter in (TELEMETRY_FILTER, STATUS_FILTER, COMMAND_ACK_FILTER):
        assert allowed(ingest, "subscribe", shared_subscription("ingest-a", topic_filter)), topic_filter
    assert allowed(ingest, "publish", "devices/commands/dev-1")
    assert not allowed(ingest, "publish", "devices/commands/dev-1/ack")
    assert not allowed(ingest, "publish", "devices/telemetry/dev-1")
    api = SERVICE_ROLES["api"]
    assert allowed(api, "publish", "devices/commands/dev-1")
