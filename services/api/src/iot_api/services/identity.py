"""Device identity on the broker: MQTT credentials, their provisioning, and the EMQX hook decisions.

- A device's MQTT username is its id; its secret (``iotd_`` and 32 random bytes, URL-safe) is generated
  here and shown once. Only its SHA-256 is stored: the secret has 256 bits of entropy, so a fast hash is
  safe (as for API keys) and keeps the EMQX authentication hook cheap.
- With ``IOT_MQTT_ADMIN_URL`` set, each change is applied to Mosquitto's dynamic-security plugin inside
  the database transaction that records it: if the broker does not answer, the transaction is rolled
  back and the caller gets a 503; nothing is half-done. Creating a device whose credential cannot be
  provisioned removes the device again.
- The EMQX hooks read the credential from the Redis cache (``IOT_API_CACHE_TTL_S``), falling back to the
  database; every change deletes the cache entry.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import msgspec
import structlog

from iot_api.errors import Conflict, NotFound, Unauthenticated
from iot_api.repositories.credentials import CredentialRepository
from iot_api.schemas.devices import DeviceCreate
from iot_api.schemas.identity import (
    AuthnAnswer,
    AuthnRequest,
    AuthzAnswer,
    AuthzRequest,
    CredentialStatus,
    DeviceCreated,
    MqttCredentials,
)
from iot_api.services.broker import DynsecProvisioner
from iot_api.services.devices import DeviceService
from iot_api.services.mqtt_acl import RESERVED_USERNAMES, SERVICE_ROLES, Rule, allowed, device_rules
from iot_api.tenancy import TenantScope
from iot_common.topics import is_valid_device_id

log = structlog.stdlib.get_logger("iot_api.identity")
SECRET_PREFIX = "iotd_"
HOOK_SECRET_HEADER = "X-Hook-Secret"


class _Cached(msgspec.Struct, frozen=True):
    """A device's credential as the hooks need it; ``h`` empty when there is none."""

    h: str
    active: bool


_cached_decoder = msgspec.json.Decoder(_Cached)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ServiceUser(msgspec.Struct, frozen=True):
    name: str
    role: str
    password: str


def parse_service_users(entries: list[str]) -> dict[str, ServiceUser]:
    """``username:role:password`` entries of ``IOT_MQTT_SERVICE_USERS`` (validated by the settings)."""
    users = {}
    for entry in entries:
        name, role, password = entry.split(":", 2)
        users[name] = ServiceUser(name, role, password)
    return users


class IdentityService:
    def __init__(
        self,
        repo: CredentialRepository,
        devices: DeviceService,
        broker: DynsecProvisioner | None,
        service_users: dict[str, ServiceUser],
        hook_secret: str = "",
    ) -> None:
        """Credentials are cached like devices: in the devices' cache, for as long."""
        self.repo = repo
        self.devices = devices
        self.cache = devices.cache
        self.reserved = RESERVED_USERNAMES | set(service_users)
        self.broker = broker
        self.service_users = service_users
        self.hook_secret = hook_secret

    def check_hook_secret(self, given: str | None) -> None:
        """The broker's hooks are on only with ``IOT_MQTT_HOOK_SECRET``, and answer only to it."""
        if not self.hook_secret:
            raise NotFound("the MQTT hooks are disabled (IOT_MQTT_HOOK_SECRET is not set)")
        if given is None or not hmac.compare_digest(given.encode(), self.hook_secret.encode()):
            raise Unauthenticated(f"wrong or missing {HOOK_SECRET_HEADER}")

    def cache_key(self, device_id: str) -> str:
        """The hooks' cache entry of a device's credential."""
        return self.cache.key("mqtt", "cred", device_id)

    async def _forget_cached(self, device_id: str) -> None:
        if not await self.cache.delete(self.cache_key(device_id)):
            log.warning("credential changed but its cache entry could not be deleted", device_id=device_id)

    def _refuse_reserved(self, device_id: str) -> None:
        if device_id in self.reserved:
            raise Conflict(f"{device_id!r} is the MQTT user of a platform service; choose another device id")

    async def register(self, tenant: TenantScope, data: DeviceCreate) -> DeviceCreated:
        """Create the device and its credentials; if these cannot be issued, the device is removed."""
        if data.id is not None:
            self._refuse_reserved(data.id)
        device = await self.devices.create(tenant, data)
        try:
            credentials = await self._issue(tenant, device.id)
        except BaseException:
            await self.devices.delete(tenant, device.id)
            raise
        return DeviceCreated(**msgspec.structs.asdict(device), mqtt=credentials)

    async def rotate(self, tenant: TenantScope, device_id: str) -> MqttCredentials:
        """A new secret; the old one stops working (and an open connection keeps running until it
        reconnects, which then needs the new secret)."""
        await self.devices.require(tenant, device_id)
        self._refuse_reserved(device_id)
        return await self._issue(tenant, device_id)

    async def _issue(self, tenant: TenantScope, device_id: str) -> MqttCredentials:
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)

        async def provision() -> None:
            if self.broker is not None:
                await self.broker.provision(device_id, secret)

        if not await self.repo.set_secret(tenant.tenant_id, device_id, hash_secret(secret), provision):
            raise NotFound(f"device {device_id!r} not found")
        await self._forget_cached(device_id)
        return MqttCredentials(username=device_id, password=secret)

    async def revoke(self, tenant: TenantScope, device_id: str) -> None:
        """Refuse the credential from now on; the broker also cuts an open connection."""
        await self.devices.require(tenant, device_id)

        async def disable() -> None:
            if self.broker is not None and device_id not in self.reserved:
                await self.broker.disable(device_id)

        await self.repo.revoke(tenant.tenant_id, device_id, disable)
        await self._forget_cached(device_id)

    async def delete_device(self, tenant: TenantScope, device_id: str) -> None:
        """Delete the device's broker user first (503 if the broker is away), then the device."""
        await self.devices.require(tenant, device_id)
        if self.broker is not None and device_id not in self.reserved:
            await self.broker.delete(device_id)
        await self.devices.delete(tenant, device_id)
        await self._forget_cached(device_id)

    async def status(self, tenant: TenantScope, device_id: str) -> CredentialStatus:
        await self.devices.require(tenant, device_id)
        row = await self.repo.get(device_id)
        if row is None:
            return CredentialStatus(device_id, device_id, False, None, None, None)
        return CredentialStatus(
            device_id, device_id, row.revoked_at is None, row.created_at, row.rotated_at, row.revoked_at
        )

    async def _credential(self, device_id: str) -> _Cached:
        key = self.cache_key(device_id)
        cached = await self.cache.get(key)
        if cached is not None:
            try:
                return _cached_decoder.decode(cached)
            except msgspec.DecodeError:
                pass
        row = await self.repo.get(device_id)
        entry = _Cached("", False) if row is None else _Cached(row.secret_hash, row.revoked_at is None)
        await self.cache.set(key, msgspec.json.encode(entry), self.devices.ttl_s)
        return entry

    async def authn_hook(self, hook_secret: str | None, request: AuthnRequest) -> AuthnAnswer:
        """The EMQX authentication hook, for a caller with the hook secret: :meth:`authenticate`."""
        self.check_hook_secret(hook_secret)
        return await self.authenticate(request.username, request.password)

    async def authz_hook(self, hook_secret: str | None, request: AuthzRequest) -> AuthzAnswer:
        """The EMQX authorisation hook, for a caller with the hook secret: :meth:`authorize`."""
        self.check_hook_secret(hook_secret)
        return await self.authorize(request.username, request.action, request.topic)

    async def authenticate(self, username: str | None, password: str | None) -> AuthnAnswer:
        """EMQX authentication: service users by their configured password, devices by their secret.

        ``ignore`` for a user name that is neither (EMQX then asks its next authenticator, or refuses).
        """
        if not username:
            return AuthnAnswer("ignore")
        service = self.service_users.get(username)
        if service is not None:
            ok = password is not None and hmac.compare_digest(service.password.encode(), password.encode())
            return AuthnAnswer("allow" if ok else "deny")
        if not is_valid_device_id(username) or username in self.reserved:
            return AuthnAnswer("ignore")
        entry = await self._credential(username)
        if not entry.h:
            return AuthnAnswer("ignore")
        if not entry.active or password is None:
            return AuthnAnswer("deny")
        ok = hmac.compare_digest(entry.h, hash_secret(password))
        return AuthnAnswer("allow" if ok else "deny")

    async def authorize(self, username: str | None, action: str, topic: str) -> AuthzAnswer:
        """EMQX authorisation: a device only on its own topics, a service user per its role; else deny."""
        if not username or action not in ("publish", "subscribe"):
            return AuthzAnswer("deny")
        service = self.service_users.get(username)
        rules: tuple[Rule, ...]
        if service is not None:
            rules = SERVICE_ROLES.get(service.role, ())
            return AuthzAnswer("allow" if allowed(rules, action, topic) else "deny")
        if not is_valid_device_id(username) or username in self.reserved:
            return AuthzAnswer("deny")
        if not allowed(device_rules(username), action, topic, literal=True):
            return AuthzAnswer("deny")
        # A revoked credential also loses its rights on connections EMQX has not yet closed.
        entry = await self._credential(username)
        return AuthzAnswer("allow" if entry.active else "deny")
