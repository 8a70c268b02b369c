"""What a simulated device answers to a command it receives on ``devices/commands/{id}``.

The answer is a ``CommandAck`` on ``devices/commands/{id}/ack``; ingest records it as ``acked`` (status
``ok``, with ``result``) or ``failed`` (status ``error``, with ``error``). Commands the simulator knows:

- ``ping``: changes nothing; result ``{"pong": true, "uptime_s": ..., "interval_s": ...}``.
- ``reboot`` (params ignored): the uptime and the metrics' drift start again; result
  ``{"rebooted": true, "uptime_s": <uptime before>}``.
- ``set_interval`` with ``{"interval_s": 0.01-86400}``: the seconds between the device's readings (a
  shorter interval applies at once); result ``{"interval_s": <new>, "previous_s": <old>}``.

Any other name, or ``set_interval`` without a valid ``interval_s``, is answered ``error`` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import msgspec

from iot_common.messages import CommandAck, CommandMessage
from iot_sim.model import DeviceModel

KNOWN_COMMANDS: Final = ("ping", "reboot", "set_interval")
MIN_INTERVAL_S: Final = 0.01
MAX_INTERVAL_S: Final = 86400.0

_command_decoder: Final = msgspec.json.Decoder(CommandMessage)
_ack_encoder: Final = msgspec.json.Encoder()


class _IdOnly(msgspec.Struct):
    id: str


_id_decoder: Final = msgspec.json.Decoder(_IdOnly)


@dataclass
class SimulatedDevice:
    """One device of the fleet: its metrics, its publish schedule (monotonic seconds) and its uptime."""

    device_id: str
    model: DeviceModel
    interval_s: float
    next_due: float
    booted_at: float
    state_version: int = 0
    """The last desired-state version applied (:mod:`iot_sim.state`)."""


def answer(device: SimulatedDevice, payload: bytes, now: float) -> CommandAck | None:
    """Apply the command in ``payload`` to ``device`` and return its answer (``now``: monotonic seconds).

    None when the payload has no command id to answer to (it is not a ``CommandMessage``).
    """
    try:
        command = _command_decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        try:
            command_id = _id_decoder.decode(payload).id
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return None
        return CommandAck(command_id, "error", error=f"malformed command: {exc}")
    uptime = round(now - device.booted_at, 1)
    if command.name == "ping":
        return CommandAck(
            command.id, result={"pong": True, "uptime_s": uptime, "interval_s": device.interval_s}
        )
    if command.name == "reboot":
        device.booted_at = now
        device.model.offsets.clear()
        return CommandAck(command.id, result={"rebooted": True, "uptime_s": uptime})
    if command.name == "set_interval":
        return _set_interval(device, command, now)
    known = ", ".join(KNOWN_COMMANDS)
    return CommandAck(command.id, "error", error=f"unknown command {command.name[:64]!r} (known: {known})")


def _set_interval(device: SimulatedDevice, command: CommandMessage, now: float) -> CommandAck:
    value: Any = command.params.get("interval_s")
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (MIN_INTERVAL_S <= value <= MAX_INTERVAL_S)
    ):
        return CommandAck(
            command.id,
            "error",
            error=f"set_interval needs params.interval_s, {MIN_INTERVAL_S} to {MAX_INTERVAL_S:g} seconds",
        )
    previous, device.interval_s = device.interval_s, float(value)
    # A shorter interval applies at once, a longer one after the reading already scheduled.
    device.next_due = min(device.next_due, now + device.interval_s)
    return CommandAck(command.id, result={"interval_s": device.interval_s, "previous_s": previous})


def encode_ack(ack: CommandAck) -> bytes:
    return _ack_encoder.encode(ack)
