"""Tenants (platform admins only) and the audit log of a tenant."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from iot_api.schemas.common import Page
from iot_common.tenancy import TENANT_NAME_PATTERN

TenantName = Annotated[
    str, msgspec.Meta(pattern=TENANT_NAME_PATTERN, description="1-64 letters, digits, '_', '.', '-'")
]
MaxDevices = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
MaxReadings = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]


class Tenant(msgspec.Struct, frozen=True):
    """A tenant and its limits (null: no limit)."""

    id: str
    name: str
    max_devices: int | None
    max_readings_per_s: int | None
    created_at: datetime
    updated_at: datetime


class TenantCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: TenantName
    max_devices: MaxDevices | None = None
    max_readings_per_s: MaxReadings | None = None


class TenantUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Fields to change; a limit set to null is removed."""

    name: TenantName | msgspec.UnsetType = msgspec.UNSET
    max_devices: MaxDevices | msgspec.UnsetType | None = msgspec.UNSET
    max_readings_per_s: MaxReadings | msgspec.UnsetType | None = msgspec.UNSET


class TenantPage(Page, frozen=True):
    items: list[Tenant]


class AuditEvent(msgspec.Struct, frozen=True):
    """One state-changing request: when, who (``user:<id>`` or ``key:<id>``), what (``action``: the
    operation id, and ``method`` ``path``), on what (``target``), its request id and outcome (``status``;
    ``outcome``: ``ok`` for 2xx, ``refused`` for 4xx, ``failed`` for 5xx)."""

    id: int
    at: datetime
    actor: str
    actor_kind: Literal["user", "api_key"]
    action: str
    method: str
    path: str
    target: str | None
    request_id: str
    status: int
    outcome: Literal["ok", "refused", "failed"]


class AuditPage(Page, frozen=True):
    items: list[AuditEvent]
