"""Every shell example of docs/api.md, then of docs/tenancy.md, then of docs/http-ingest.md, runs, in
order, against a live API and ingest service.

The ```sh blocks of the pages are run one after the other, each by its own ``bash`` with
``set -euo pipefail``, and each starts with the variables the blocks before it defined (the page's own
walk-through: log in, make a key, create a device, publish its readings, ...). The page reads its base
URL, broker, ingest service and admin password from ``API``, ``MQTT_HOST``, ``MQTT_PORT``, ``INGEST`` and
``ADMIN_PASSWORD`` when they are set, which is how the test points it at private processes.

Every ``curl`` of the examples is checked, whatever its options: it must answer 2xx, unless the line
before it says ``# expect <status>``, and then exactly that status. A block that fails fails the test
with the block's text, its output and the services' logs.

The page is run twice: against a broker that lets anyone in, as ``make run`` uses, and against the shipped
broker set-up (dynamic security, each service its own user, the API provisioning each device), as Compose
runs it, where the device's ``mosquitto_pub`` calls work only with the credentials the page obtained.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from iot_testkit.backends import unavailable
from iot_testkit.processes import ServiceProcess, free_port, mosquitto
from tests.e2e.broker_support import PASSWORDS, shipped_broker

Start = Callable[[str, Mapping[str, str]], ServiceProcess]
ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "api.md"
DOCS = [DOC, ROOT / "docs" / "tenancy.md", ROOT / "docs" / "http-ingest.md"]
"""The pages run, in this order: tenancy.md and http-ingest.md continue the walk-through of api.md (its
log-in, its key, its devices)."""
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
EXPECT = re.compile(r"^\s*# expect (\d{3})\b")
BLOCK_TIMEOUT_S = 90
"""Generous: a block that waits for ingest (``until ...``) on a busy shared machine still finishes."""

PRELUDE = r"""
set -euo pipefail
# Every curl answers 2xx, or the status the doc announced (EXPECT_STATUS, set from "# expect NNN").
curl() {
    local want=${EXPECT_STATUS:-2xx} headers status rc=0
    headers=$(mktemp)
    command curl -D "$headers" "$@" || rc=$?
    status=$(awk '/^HTTP\//{s=$2} END{print s}' "$headers")
    rm -f "$headers"
    if [[ $want == 2xx && $status != 2?? ]] || [[ $want != 2xx && $status != "$want" ]]; then
        echo "docs example: curl answered HTTP ${status:-nothing} (curl exit $rc), expected $want" >&2
        return 1
    fi
    return "$rc"
}
__before=$(compgen -v)
[[ -f $DOC_STATE ]] && source "$DOC_STATE"
"""

EPILOGUE = r"""
# Hand every variable the examples defined so far to the next block.
for __v in $(compgen -v); do
    [[ $__v == __* || $__v == BASH* || $__v == _ ]] && continue
    grep -qxF "$__v" <<<"$__before" || declare -p "$__v"
done > "$DOC_STATE.new"
mv "$DOC_STATE.new" "$DOC_STATE"
"""


def shell_blocks(markdown: str) -> list[str]:
    """The page's ```sh and ```bash blocks, in order."""
    return [body for lang, body in FENCE.findall(markdown) if lang in ("sh", "bash")]


def with_expectations(block: str) -> str:
    """``# expect NNN`` before a ``curl`` line becomes ``EXPECT_STATUS=NNN curl ...`` on that line."""
    lines = block.splitlines()
    for index, line in enumerate(lines):
        match = EXPECT.match(line)
        if not match:
            continue
        following = lines[index + 1] if index + 1 < len(lines) else ""
        assert following.lstrip().startswith("curl "), (
            f"'# expect' must be followed by a curl line, not {following!r}:\n{block}"
        )
        lines[index + 1] = following.replace("curl ", f"EXPECT_STATUS={match.group(1)} curl ", 1)
    return "\n".join(lines) + "\n"


def test_every_curl_of_the_pages_is_in_a_shell_block() -> None:
    """Examples outside ```sh blocks would not be run by the test below."""
    for doc in DOCS:
        others = [body for lang, body in FENCE.findall(doc.read_text()) if lang not in ("sh", "bash")]
        assert not [body for body in others if re.search(r"^\s*curl ", body, re.MULTILINE)], doc


def test_expect_markers_apply_to_the_next_curl_only() -> None:
    block = "# expect 409\ncurl -sS -X POST $API/x\ncurl -fsS $API/y\n"
    assert with_expectations(block) == (
        "# expect 409\nEXPECT_STATUS=409 curl -sS -X POST $API/x\ncurl -fsS $API/y\n"
    )


@dataclass(frozen=True)
class Broker:
    port: int
    api_env: dict[str, str]
    ingest_url: str


@pytest.fixture(params=["make_run_broker", "compose_broker"])
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    """A private broker: anonymous (``make run``), or the shipped set-up with its users (Compose)."""
    if request.param == "make_run_broker":
        with mosquitto() as url:
            yield Broker(urlsplit(url).port or 1883, {"IOT_MQTT_URL": url}, url)
        return
    with shipped_broker() as port:
        local = f"127.0.0.1:{port}"
        yield Broker(
            port,
            {
                "IOT_MQTT_URL": f"mqtt://api:{PASSWORDS['MQTT_API_PASSWORD']}@{local}",
                "IOT_MQTT_ADMIN_URL": f"mqtt://admin:{PASSWORDS['MQTT_ADMIN_PASSWORD']}@{local}",
            },
            f"mqtt://ingest:{PASSWORDS['MQTT_INGEST_PASSWORD']}@{local}",
        )


def test_every_shell_example_of_the_api_and_tenancy_pages_runs_against_the_live_services(
    service: Start,
    database_url: str,
    redis_url: str,
    broker: Broker,
    unique: str,
    tmp_path: Path,
) -> None:
    for tool in ("curl", "jq", "mosquitto_pub"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is needed to run the examples of docs/api.md (see the page)")
    password = secrets.token_urlsafe(18)
    hook_secret = secrets.token_urlsafe(24)
    common = {
        "IOT_DATABASE_URL": database_url,
        "IOT_REDIS_URL": redis_url,
        "IOT_REDIS_PREFIX": f"docs{unique}",
    }
    api_port, ingest_port = free_port(), free_port()
    api = service(
        "iot-api",
        {
            **common,
            **broker.api_env,
            "IOT_API_PORT": str(api_port),
            "IOT_BOOTSTRAP_ADMIN_EMAIL": "admin@example.com",
            "IOT_BOOTSTRAP_ADMIN_PASSWORD": password,
            "IOT_MQTT_HOOK_SECRET": hook_secret,
        },
    )
    ingest = service(
        "iot-ingest",
        {
            **common,
            "IOT_MQTT_URL": broker.ingest_url,
            "IOT_INGEST_HTTP_PORT": str(ingest_port),
            "IOT_MQTT_SHARE_GROUP": f"docs-{unique}",
            "IOT_MQTT_CLIENT_ID": f"docs-{unique}",
        },
    )
    base = f"http://127.0.0.1:{api_port}"
    api.wait_http(f"{base}/readyz")
    ingest.wait_http(f"http://127.0.0.1:{ingest_port}/readyz")

    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "LC_ALL": "C.UTF-8",
        "API": base,
        "MQTT_HOST": "127.0.0.1",
        "MQTT_PORT": str(broker.port),
        "INGEST": f"http://127.0.0.1:{ingest_port}",
        "ADMIN_PASSWORD": password,
        "IOT_MQTT_HOOK_SECRET": hook_secret,
        "DOC_STATE": str(tmp_path / "state.sh"),
    }
    blocks = [(doc, block) for doc in DOCS for block in shell_blocks(doc.read_text())]
    assert len(blocks) >= 20, f"only {len(blocks)} shell blocks found in {DOCS}"
    for number, (doc, block) in enumerate(blocks, 1):
        script = PRELUDE + with_expectations(block) + EPILOGUE
        try:
            result = subprocess.run(
                ["bash", "-c", script],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT_S,
                check=False,
            )
            failure = None if result.returncode == 0 else f"exit status {result.returncode}"
            output = result.stdout + result.stderr
        except subprocess.TimeoutExpired as exc:
            failure = f"no end within {BLOCK_TIMEOUT_S}s"
            output = _text(exc.stdout) + _text(exc.stderr)
        if failure:
            pytest.fail(
                f"docs/{doc.name}, shell example {number} of {len(blocks)} failed ({failure}):\n"
                f"{block}\n--- its output:\n{output[-4000:]}\n"
                f"--- iot-api log:\n{api.logs()[-3000:]}\n--- iot-ingest log:\n{ingest.logs()[-3000:]}",
                pytrace=False,
            )


def _text(data: str | bytes | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""
