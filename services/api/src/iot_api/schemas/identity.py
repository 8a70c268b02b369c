"""Bodies of the device-identity endpoints: MQTT credentials and the EMQX authentication hooks."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from iot_api.schemas.devices import Device

HookResult = Literal["allow", "deny", "ignore"]


class MqttCredentials(msgspec.Struct, frozen=True):
    """What a device connects with: ``password`` is shown in this response only."""

    username: str
    password: str


class DeviceCreated(Device, frozen=True):
    """The new device and its MQTT credentials (shown once)."""

    mqtt: MqttCredentials


class CredentialStatus(msgspec.Struct, frozen=True):
    """A device's MQTT credential without its secret."""

    device_id: str
    username: str
    active: bool
    created_at: datetime | None
    rotated_at: datetime | None
    revoked_at: datetime | None


class AuthnRequest(msgspec.Struct, frozen=True):
    """What EMQX 5's HTTP authenticator sends (its ``body`` setting; other fields are ignored)."""

    username: str | None = None
    password: str | None = None
    clientid: str | None = None


class AuthnAnswer(msgspec.Struct, frozen=True):
    result: HookResult
    is_superuser: bool = False


class AuthzRequest(msgspec.Struct, frozen=True):
    """What EMQX 5's HTTP authorizer sends (its ``body`` setting; other fields are ignored)."""

    topic: str
    action: str
    username: str | None = None
    clientid: str | None = None


class AuthzAnswer(msgspec.Struct, frozen=True):
    result: HookResult
