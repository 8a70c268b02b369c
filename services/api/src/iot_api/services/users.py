"""Users of a tenant: created, listed, changed and deleted by the tenant's admins; a user changes their own
password.

- E-mails are unique across tenants (a login names no tenant): taking one that exists is a 409.
- A platform admin's account is changed only by a platform admin (a tenant admin of the default tenant
  must not take over the platform).
- A change of role, a disabling or a deletion applies at once to the API keys the user created (their
  cached verification is dropped; a deleted user's keys are revoked) and to the next token refresh; an
  access token already issued keeps its role until it expires (``IOT_API_ACCESS_TOKEN_TTL_S``).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import msgspec

from iot_api.errors import Conflict, Forbidden, Invalid, NotFound
from iot_api.pagination import TIME_AND_UUID, paginate
from iot_api.queries import PageRequest
from iot_api.repositories.accounts import AccountRepository
from iot_api.schemas.accounts import User, UserCreate, UserPage, UserUpdate
from iot_api.services.auth import AuthService, hash_password
from iot_api.tenancy import TenantScope

ADMIN_ONLY = "managing users needs the 'admin' permission (a user may change their own password)"


def _not_found(user_id: UUID) -> NotFound:
    return NotFound(f"user '{user_id}' not found")


class UserService:
    def __init__(self, accounts: AccountRepository, auth: AuthService) -> None:
        self.accounts = accounts
        self.auth = auth

    async def create(self, tenant: TenantScope, data: UserCreate) -> User:
        """A new user of the tenant with ``role``."""
        password_hash = await self.auth.passwords.run(hash_password, data.password)
        user = await self.accounts.create_user(tenant.tenant_id, data.email, password_hash, data.role)
        if user is None:
            raise Conflict("a user with this e-mail exists")
        return user

    async def list(self, tenant: TenantScope, page: PageRequest) -> UserPage:
        return await paginate(
            UserPage,
            page,
            TIME_AND_UUID,
            lambda after, n: self.accounts.list_users(tenant.tenant_id, after=after, limit=n),
            lambda user: (user.created_at, user.id),
        )

    async def _target(self, tenant: TenantScope, user_id: UUID) -> User:
        user = await self.accounts.user_of(tenant.tenant_id, user_id)
        if user is None:
            raise _not_found(user_id)
        if user.platform_admin and not tenant.principal.platform_admin:
            raise Forbidden("a platform admin's account is changed by a platform admin only")
        return user

    async def update(self, tenant: TenantScope, user_id: UUID, data: UserUpdate) -> User:
        """Change role, disabled or password (tenant admins); a user's own password (anyone, with
        ``current_password``)."""
        principal = tenant.principal
        is_self = principal.kind == "user" and principal.user_id == user_id
        admin_fields = data.role is not msgspec.UNSET or data.disabled is not msgspec.UNSET
        if not tenant.allows("admin") and (admin_fields or not is_self):
            raise Forbidden(ADMIN_ONLY)
        user = await self._target(tenant, user_id)
        changes: dict[str, Any] = {}
        if data.role is not msgspec.UNSET:
            if user.platform_admin and data.role != "admin":
                raise Invalid("role", "a platform admin stays admin", "body")
            changes["role"] = data.role
        if data.disabled is not msgspec.UNSET:
            if user.platform_admin and data.disabled:
                raise Invalid("disabled", "a platform admin cannot be disabled", "body")
            changes["disabled"] = data.disabled
        if data.password is not msgspec.UNSET:
            if is_self:
                await self._check_current_password(user_id, data.current_password)
            changes["password_hash"] = await self.auth.passwords.run(hash_password, data.password)
        if not changes:
            return user
        updated = await self.accounts.update_user(tenant.tenant_id, user_id, changes)
        if updated is None:
            raise _not_found(user_id)
        if "role" in changes or "disabled" in changes:
            await self.auth.forget_keys(await self.accounts.key_prefixes_created_by(user_id))
        return updated

    async def _check_current_password(self, user_id: UUID, given: str | msgspec.UnsetType) -> None:
        row = await self.accounts.user_by_id(user_id)
        if isinstance(given, msgspec.UnsetType):
            raise Invalid("current_password", "required to change your own password", "body")
        ok = row is not None and await self.auth.check_password(row.password_hash, given)
        if not ok:
            raise Invalid("current_password", "wrong password", "body")

    async def delete(self, tenant: TenantScope, user_id: UUID) -> None:
        """Delete the tenant's user; the API keys it created are revoked."""
        await self._target(tenant, user_id)
        prefixes = await self.accounts.delete_user(tenant.tenant_id, user_id)
        if prefixes is None:
            raise _not_found(user_id)
        await self.auth.forget_keys(prefixes)
