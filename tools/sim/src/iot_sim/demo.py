"""The demo alert rule: a simulated device's temperature spike opens an alert.

The simulator registers its devices with the type ``simulated``; their temperature drifts around 21 °C and
a spike (``--spike-probability``) adds 40 °C, so the rule's threshold of 45 °C is crossed by spikes only.
:func:`seed_demo_rule` creates it through the API unless a rule of the same name exists (``iot-sim
--seed-demo-rule`` calls it).
"""

from __future__ import annotations

from typing import Any, Final

import httpx

DEVICE_TYPE: Final = "simulated"
"""The type the simulator registers its devices with (``POST /api/v1/devices``)."""
DEMO_RULE_NAME: Final = "demo: simulated temperature spike"


class ApiRefused(RuntimeError):
    """The API answered a request with an error status."""


def demo_rule() -> dict[str, Any]:
    """Body of ``POST /api/v1/alert-rules`` for the demo rule."""
    return {
        "name": DEMO_RULE_NAME,
        "device_type": DEVICE_TYPE,
        "metric": "temperature",
        "op": ">",
        "threshold": 45.0,
        "hysteresis": 5.0,
        "severity": "warning",
        "message": "temperature spike on a simulated device",
    }


def seed_demo_rule(api_url: str, api_key: str) -> tuple[str, bool]:
    """Create the demo rule unless a rule named :data:`DEMO_RULE_NAME` exists on the device type
    :data:`DEVICE_TYPE`; returns (rule id, whether it was created now). Needs the ``write`` scope.

    Idempotent for one caller at a time (two concurrent first calls can both create it).
    """
    with httpx.Client(base_url=api_url, headers={"X-API-Key": api_key}, timeout=10) as http:
        params: dict[str, str | int] = {"device_type": DEVICE_TYPE, "limit": 500}
        while True:
            page = _ok(http.get("/api/v1/alert-rules", params=params)).json()
            for rule in page["items"]:
                if rule["name"] == DEMO_RULE_NAME:
                    return str(rule["id"]), False
            if not page["has_more"]:
                break
            params["cursor"] = page["next_cursor"]
        created = _ok(http.post("/api/v1/alert-rules", json=demo_rule())).json()
        return str(created["id"]), True


def _ok(response: httpx.Response) -> httpx.Response:
    if response.is_error:
        request = response.request
        raise ApiRefused(f"{request.method} {request.url.path}: {response.status_code} {response.text[:500]}")
    return response
