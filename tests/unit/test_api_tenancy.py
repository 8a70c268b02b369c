"""The API's tenant selection and the audit hook's naming of targets (pure parts)."""

from __future__ import annotations

import uuid

import pytest

from iot_api.audit import created_id, target_of
from iot_api.errors import Forbidden, Invalid
from iot_api.tenancy import TenantScope, selected_tenant
from iot_common.auth import user_principal
from iot_common.tenancy import DEFAULT_TENANT_ID

ACME = uuid.UUID("6d1f0c5e-2f7b-4a53-9d8e-111111111111")
USER = uuid.UUID("0b8f5a8e-7d2c-4c1e-8a55-222222222222")


def test_a_credential_acts_in_its_own_tenant_unless_a_platform_admin_selects_another() -> None:
    member = user_principal(USER, ACME, "admin")
    platform = user_principal(USER, DEFAULT_TENANT_ID, "admin", platform_admin=True)
    assert selected_tenant(member, None) == ACME
    assert selected_tenant(member, str(ACME)) == ACME
    with pytest.raises(Forbidden):
        selected_tenant(member, str(DEFAULT_TENANT_ID))
    assert selected_tenant(platform, None) == DEFAULT_TENANT_ID
    assert selected_tenant(platform, str(ACME)) == ACME
    with pytest.raises(Invalid) as refused:
        selected_tenant(platform, "acme")
    assert (refused.value.field, refused.value.source) == ("X-Tenant-Id", "header")


def test_unattributed_dead_letters_are_for_platform_admins_in_the_default_tenant() -> None:
    platform = user_principal(USER, DEFAULT_TENANT_ID, "admin", platform_admin=True)
    assert TenantScope(DEFAULT_TENANT_ID, platform).sees_unattributed
    assert not TenantScope(ACME, platform).sees_unattributed
    assert not TenantScope(
        DEFAULT_TENANT_ID, user_principal(USER, DEFAULT_TENANT_ID, "admin")
    ).sees_unattributed


def test_an_audit_target_is_the_path_with_the_created_id() -> None:
    assert target_of("/api/v1/devices/d-1", None) == "devices/d-1"
    assert target_of("/api/v1/devices/", created_id(b'{"id": "d-2", "name": "x"}')) == "devices/d-2"
    assert target_of("/api/v1/devices/d-1/commands", created_id(b'{"id": "c3"}')) == "devices/d-1/commands/c3"
    assert target_of("/api/v1/devices/d-1", created_id(b'{"id": "d-1"}')) == "devices/d-1"
    assert created_id(b"") is None
    assert created_id(b"[1, 2]") is None
    assert created_id(b'{"id": 17}') == "17"
