"""Bulk provisioning: ``POST /api/v1/devices/import``, a CSV or NDJSON body of up to 100,000 devices.

All or nothing: every row is checked first (fields, ids repeated in the body, ids taken in the database,
names of platform MQTT users); with any wrong row the answer is 422 listing each with its line and reason,
and nothing is stored. Otherwise the devices (and their credentials) are stored in one transaction. A half
imported fleet whose secrets were shown once is hard to recover from: the client would have to find which
rows were stored, and the secrets of those it lost are gone; a refused import is fixed and sent again.

With ``credentials``, each device gets an MQTT secret (only its SHA-256 is stored) and the answer is the
CSV ``id,username,password``, shown once. With ``IOT_MQTT_ADMIN_URL`` the broker users are created in
batched messages inside the transaction (at most ``IOT_API_IMPORT_MAX_BROKER_DEVICES`` per import: the
plugin saves its whole file after every command, see docs/device-identity.md).
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import re
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import msgspec
import structlog

from iot_api.errors import Conflict, Invalid, RateLimited, RowError, RowsInvalid, TooLarge
from iot_api.repositories.devices import DeviceLimitReached, DeviceRepository, ImportRecord
from iot_api.schemas.imports import ImportResult, ImportRow
from iot_api.services.identity import SECRET_PREFIX, IdentityService
from iot_api.tenancy import TenantScope
from iot_common.db.jsonb import unstorable_json
from iot_common.topics import DEVICE_TYPE_PATTERN, is_valid_device_id

log = structlog.stdlib.get_logger("iot_api.imports")

CSV_TYPES = ("text/csv",)
NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl", "application/json")
"""A single JSON object (``application/json``) is an NDJSON body of one line."""
KNOWN_COLUMNS = ("id", "name", "type")
MAX_REPORTED_ROWS = 1000
MAX_ATTRIBUTES_BYTES = 16_384
MAX_NAME = 200
_TYPE_RE = re.compile(DEVICE_TYPE_PATTERN)
_AT_RE = re.compile(r" - at `\$\.?([^`]*)`$")
_FIELD_RE = re.compile(r"field `([^`]*)`")
_row_decoder = msgspec.json.Decoder(ImportRow)


class ParsedRow(msgspec.Struct):
    line: int
    id: str
    name: str
    type: str
    attributes: dict[str, Any]


def _check_fields(row: ParsedRow, errors: list[RowError]) -> None:
    """The checks a row's fields must pass (the same as ``POST /api/v1/devices``), each failure reported."""
    if not is_valid_device_id(row.id):
        errors.append(
            RowError(row.line, row.id or None, "id", "required; letters, digits and _.:- (64 at most)")
        )
    if len(row.name) > MAX_NAME or "\x00" in row.name:
        errors.append(RowError(row.line, row.id or None, "name", "at most 200 characters, no NUL"))
    if not _TYPE_RE.match(row.type):
        errors.append(RowError(row.line, row.id or None, "type", "1 to 64 letters, digits or _.:-"))
    if problem := unstorable_json(row.attributes, "attributes"):
        errors.append(RowError(row.line, row.id or None, problem[0], problem[1]))
    elif len(msgspec.json.encode(row.attributes)) > MAX_ATTRIBUTES_BYTES:
        errors.append(RowError(row.line, row.id or None, "attributes", "more than 16 KiB of JSON"))


def parse_csv(text: str, errors: list[RowError], max_rows: int) -> list[ParsedRow]:
    """Rows of a CSV with a header: ``id`` (required), ``name``, ``type``; any other column is an attribute
    (``attributes.key`` or ``key``: the attribute ``key``, a string; an empty cell sets nothing)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise Invalid("body", "the CSV has no header line (id,name,type,...)", "body")
    names = [h.strip() for h in header]
    if "id" not in names:
        raise Invalid("body", "the CSV header has no `id` column", "body")
    keys = [n.removeprefix("attributes.") if n not in KNOWN_COLUMNS else n for n in names]
    repeated = sorted(k for k, n in Counter(keys).items() if n > 1)
    if repeated or "" in keys:
        raise Invalid("body", f"the CSV header repeats or leaves empty a column: {repeated or ['']}", "body")
    rows: list[ParsedRow] = []
    for fields in reader:
        line = reader.line_num
        if not fields:
            continue
        if len(rows) >= max_rows:
            raise Invalid("body", f"more than {max_rows} rows (IOT_API_IMPORT_MAX_ROWS)", "body")
        if len(fields) != len(keys):
            errors.append(
                RowError(line, fields[0] or None, "row", f"{len(fields)} fields, the header has {len(keys)}")
            )
            continue
        values = dict(zip(keys, fields, strict=True))
        attributes = {k: v for k, v in values.items() if k not in KNOWN_COLUMNS and v != ""}
        rows.append(
            ParsedRow(line, values["id"], values.get("name", ""), values.get("type") or "generic", attributes)
        )
    return rows


def parse_ndjson(data: bytes, errors: list[RowError], max_rows: int) -> list[ParsedRow]:
    """One JSON object a line: ``{"id", "name", "type", "attributes"}`` like ``POST /api/v1/devices``
    (``id`` required); blank lines are skipped."""
    rows: list[ParsedRow] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        if len(rows) >= max_rows:
            raise Invalid("body", f"more than {max_rows} rows (IOT_API_IMPORT_MAX_ROWS)", "body")
        try:
            item = _row_decoder.decode(raw)
        except msgspec.ValidationError as exc:
            message = str(exc)
            at = _AT_RE.search(message)
            named = _FIELD_RE.search(message)
            field = (at.group(1) if at else "") or (named.group(1) if named else "row")
            errors.append(RowError(number, None, field.split(".")[0].split("[")[0], _AT_RE.sub("", message)))
            continue
        except (msgspec.DecodeError, RecursionError):
            errors.append(RowError(number, None, "row", "not a JSON object"))
            continue
        rows.append(ParsedRow(number, item.id, item.name, item.type, item.attributes))
    return rows


def _records(rows: list[ParsedRow], credentials: bool) -> tuple[list[ImportRecord], list[str]]:
    """The rows as the repository stores them and, with ``credentials``, each one's new secret (only its
    SHA-256 goes into the record)."""
    secrets_: list[str] = []
    records: list[ImportRecord] = []
    for row in rows:
        secret_hash = None
        if credentials:
            secret = SECRET_PREFIX + secrets.token_urlsafe(32)
            secrets_.append(secret)
            secret_hash = hashlib.sha256(secret.encode()).hexdigest()
        attributes = msgspec.json.encode(row.attributes).decode()
        records.append((row.line, row.id, row.name, row.type, attributes, secret_hash))
    return records, secrets_


class Imports:
    """At most one import per principal at once in this process (each holds its body and its rows)."""

    def __init__(self) -> None:
        self.active: set[str] = set()

    @asynccontextmanager
    async def hold(self, principal: str) -> AsyncIterator[None]:
        if principal in self.active:
            raise RateLimited(
                "an import of this credential is running; retry when it is done", retry_after_s=5
            )
        self.active.add(principal)
        try:
            yield
        finally:
            self.active.discard(principal)


class ImportService:
    def __init__(
        self,
        repo: DeviceRepository,
        identity: IdentityService,
        *,
        max_rows: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        max_broker_devices: int = 1000,
    ) -> None:
        self.repo = repo
        self.identity = identity
        self.devices = identity.devices
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.max_broker_devices = max_broker_devices
        self.running = Imports()

    async def read_body(self, chunks: AsyncIterator[bytes], content_length: int | None) -> bytes:
        """The body, refused with 413 past ``IOT_API_IMPORT_MAX_BYTES`` (before reading when announced)."""
        too_large = TooLarge(f"the body is larger than {self.max_bytes} bytes (IOT_API_IMPORT_MAX_BYTES)")
        if content_length is not None and content_length > self.max_bytes:
            raise too_large
        parts: list[bytes] = []
        size = 0
        async for chunk in chunks:
            size += len(chunk)
            if size > self.max_bytes:
                raise too_large
            parts.append(chunk)
        return b"".join(parts)

    def parse(self, data: bytes, content_type: str) -> tuple[list[ParsedRow], list[RowError]]:
        """Rows of the body by its media type, and the rows refused while reading them."""
        media = content_type.split(";")[0].strip().lower()
        errors: list[RowError] = []
        if media in CSV_TYPES:
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError:
                raise Invalid("body", "the CSV is not UTF-8", "body") from None
            try:
                rows = parse_csv(text, errors, self.max_rows)
            except csv.Error as exc:
                raise Invalid("body", f"the CSV cannot be read: {exc}", "body") from None
        elif media in NDJSON_TYPES:
            rows = parse_ndjson(data, errors, self.max_rows)
        else:
            raise Invalid(
                "Content-Type", "text/csv or application/x-ndjson (one JSON object a line)", "header"
            )
        return rows, errors

    def check(self, rows: list[ParsedRow], errors: list[RowError]) -> None:
        """Every row's fields, ids repeated in the body and names of platform MQTT users."""
        first_line: dict[str, int] = {}
        for row in rows:
            _check_fields(row, errors)
            if row.id in self.identity.reserved:
                errors.append(RowError(row.line, row.id, "id", "the name of a platform MQTT user"))
            seen = first_line.setdefault(row.id, row.line)
            if seen != row.line:
                errors.append(RowError(row.line, row.id, "id", f"repeats the id of line {seen}"))

    async def import_devices(
        self, tenant: TenantScope, data: bytes, content_type: str, *, credentials: bool
    ) -> tuple[ImportResult, bytes | None]:
        """Store every device of the body, or none (422 naming each wrong row); with ``credentials``,
        the CSV ``id,username,password`` too."""
        async with self.running.hold(tenant.principal.subject):
            # Reading 100,000 rows takes a few CPU seconds: in a thread, so that the event loop keeps
            # serving the process's other requests meanwhile.
            rows, errors = await asyncio.to_thread(self._read, data, content_type)
            if errors:
                self._refuse(errors)
            if not rows:
                raise Invalid("body", "no device to import", "body")
            broker = self.identity.broker if credentials else None
            if broker is not None and len(rows) > self.max_broker_devices:
                raise Invalid(
                    "credentials",
                    f"at most {self.max_broker_devices} devices with credentials per import while the API"
                    " provisions Mosquitto's dynamic security (IOT_API_IMPORT_MAX_BROKER_DEVICES); split it",
                )
            records, secrets_ = await asyncio.to_thread(_records, rows, credentials)
            created: list[str] = []

            async def provision() -> None:
                if broker is not None:
                    created.extend(
                        await broker.provision_many([(r.id, s) for r, s in zip(rows, secrets_, strict=True)])
                    )

            try:
                taken = await self.repo.import_many(tenant.tenant_id, records, provision)
            except DeviceLimitReached as exc:
                raise Conflict(
                    f"the import would pass the tenant's device limit ({exc.limit} devices, max_devices)"
                ) from None
            except asyncpg.UniqueViolationError:
                # A device of the body was created by another request between the check and the insert.
                raise Conflict("a device of the import was created meanwhile; nothing was imported") from None
            except BaseException:
                if broker is not None and created:
                    await broker.delete_many(created)
                raise
            if taken:
                self._refuse([RowError(line, id_, "id", "already exists") for line, id_ in taken])
            await self._invalidate(tenant, [r.id for r in rows])
        log.info("devices imported", tenant=str(tenant.tenant_id), devices=len(rows), credentials=credentials)
        answer = None
        if credentials:
            lines = ["id,username,password"] + [
                f"{r.id},{r.id},{s}" for r, s in zip(rows, secrets_, strict=True)
            ]
            answer = ("\r\n".join(lines) + "\r\n").encode()
        return ImportResult(imported=len(rows), credentials=credentials), answer

    def _read(self, data: bytes, content_type: str) -> tuple[list[ParsedRow], list[RowError]]:
        rows, errors = self.parse(data, content_type)
        self.check(rows, errors)
        return rows, errors

    @staticmethod
    def _refuse(errors: list[RowError]) -> None:
        errors.sort(key=lambda e: e.line)
        raise RowsInvalid(errors[:MAX_REPORTED_ROWS], len(errors))

    async def _invalidate(self, tenant: TenantScope, device_ids: list[str]) -> None:
        """New pages of the tenant's list; no stale "no credential" entry of the broker hooks' cache."""
        await self.devices.invalidate_list(tenant)
        for start in range(0, len(device_ids), 10_000):
            keys = [self.identity.cache_key(d) for d in device_ids[start : start + 10_000]]
            await self.devices.cache.delete(*keys)
