"""What a simulated device does with its desired state (docs/device-state.md).

It receives ``{"version", "desired", "delta"}`` on ``devices/state/{id}/desired``, ignores a version it
has applied already, applies what it knows, and reports on ``devices/state/{id}/reported``
``{"reported": {...}, "version": N}``. Known desired keys:

- ``target_temperature`` (a number from -50 to 150): the simulated temperature drifts towards it.

Other keys are not applied, so they stay in the delta.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from iot_common.state import DesiredMessage, ReportedMessage
from iot_sim.commands import SimulatedDevice

TARGET_RANGE: Final = (-50.0, 150.0)
_desired_decoder: Final = msgspec.json.Decoder(DesiredMessage)
_encoder: Final = msgspec.json.Encoder()


def apply_desired(device: SimulatedDevice, payload: bytes) -> ReportedMessage | None:
    """Apply a desired message to ``device``; the report to send, or None (not a desired message, or a
    version already applied)."""
    try:
        message = _desired_decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    if message.version <= device.state_version:
        return None
    device.state_version = message.version
    reported: dict[str, Any] = {}
    target = message.desired.get("target_temperature")
    if isinstance(target, int | float) and not isinstance(target, bool):
        if TARGET_RANGE[0] <= target <= TARGET_RANGE[1]:
            device.model.targets["temperature"] = float(target)
            reported["target_temperature"] = target
    elif target is None and "temperature" in device.model.targets:
        del device.model.targets["temperature"]
        reported["target_temperature"] = None
    return ReportedMessage(reported, message.version)


def encode_report(report: ReportedMessage) -> bytes:
    return _encoder.encode(report)
