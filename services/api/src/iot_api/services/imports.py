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

Progress: a client that accepts ``application/x-ndjson`` gets the answer as a stream of lines, one per
phase (parsed, validated, stored, broker batches, then done or failed; see :mod:`iot_api.schemas.imports`).
The import then runs in a task of its own, so that it ends (committed or rolled back, audited, the
principal's slot released) whether or not the client reads its answer to the end.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import re
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import msgspec
import structlog

from iot_api.errors import Conflict, Invalid, RateLimited, RowError, RowsInvalid, TooLarge
from iot_api.problems import problem_of
from iot_api.repositories.devices import DeviceLimitReached, DeviceRepository, ImportRecord
from iot_api.schemas.imports import (
    ImportBroker,
    ImportCredential,
    ImportDone,
    ImportFailed,
    ImportParsed,
    ImportPhase,
    ImportResult,
    ImportRow,
    ImportStored,
    ImportValidated,
)
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
_encoder = msgspec.json.Encoder()
LINES_PER_CHUNK = 1000
"""Data lines (refused rows, credentials) sent together in one piece of a streamed answer."""
STREAM_MEDIA_TYPE = "application/x-ndjson"

Progress = Callable[[ImportPhase], None]


def _ignore(_: ImportPhase) -> None:
    """The progress of an import whose answer is not streamed."""


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

    def acquire(self, principal: str) -> None:
        """Take the principal's slot (429 when an import of it runs); :meth:`release` gives it back."""
        if principal in self.active:
            raise RateLimited(
                "an import of this credential is running; retry when it is done", retry_after_s=5
            )
        self.active.add(principal)

    def release(self, principal: str) -> None:
        self.active.discard(principal)

    @asynccontextmanager
    async def hold(self, principal: str) -> AsyncIterator[None]:
        self.acquire(principal)
        try:
            yield
        finally:
            self.release(principal)


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
        self.streams: set[asyncio.Task[None]] = set()
        """The streamed imports running (a reference each, so that none is collected before it ends)."""

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

    @staticmethod
    def media_of(content_type: str) -> str:
        """The body's media type, one the import reads (else 422 naming ``Content-Type``)."""
        media = content_type.split(";")[0].strip().lower()
        if media not in CSV_TYPES and media not in NDJSON_TYPES:
            raise Invalid(
                "Content-Type", "text/csv or application/x-ndjson (one JSON object a line)", "header"
            )
        return media

    def parse(self, data: bytes, content_type: str) -> tuple[list[ParsedRow], list[RowError]]:
        """Rows of the body by its media type, and the rows refused while reading them (one each)."""
        media = self.media_of(content_type)
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
        else:
            rows = parse_ndjson(data, errors, self.max_rows)
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
            rows, secrets_ = await self._import(tenant, data, content_type, credentials, _ignore)
        answer = None
        if credentials:
            lines = ["id,username,password"] + [
                f"{r.id},{r.id},{s}" for r, s in zip(rows, secrets_, strict=True)
            ]
            answer = ("\r\n".join(lines) + "\r\n").encode()
        return ImportResult(imported=len(rows), credentials=credentials), answer

    def stream_import(
        self,
        tenant: TenantScope,
        data: bytes,
        content_type: str,
        *,
        credentials: bool,
        instance: str,
        request_id: str | None,
        audit: Callable[[int], Awaitable[None]],
    ) -> AsyncIterator[bytes]:
        """Start the import in a task of its own and return its answer as NDJSON lines: the phases as they
        pass, then ``done`` and the credentials, or the refused rows and ``failed``. The principal's slot
        is taken now (429 while another import of it runs); ``audit`` is awaited once with the status the
        plain answer would have had (201, or the problem's), before the last phase line."""
        principal = tenant.principal.subject
        self.running.acquire(principal)
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        task = asyncio.create_task(
            self._run_streamed(tenant, data, content_type, credentials, queue, instance, request_id, audit)
        )
        self.streams.add(task)
        task.add_done_callback(self.streams.discard)
        return _lines(queue)

    async def _run_streamed(
        self,
        tenant: TenantScope,
        data: bytes,
        content_type: str,
        credentials: bool,
        queue: asyncio.Queue[bytes | None],
        instance: str,
        request_id: str | None,
        audit: Callable[[int], Awaitable[None]],
    ) -> None:
        def emit(phase: ImportPhase) -> None:
            queue.put_nowait(_encoder.encode(phase) + b"\n")

        try:
            try:
                rows, secrets_ = await self._import(tenant, data, content_type, credentials, emit)
            except Exception as exc:
                problem, headers = problem_of(exc, instance, request_id)
                for start in range(0, len(problem.rows or ()), LINES_PER_CHUNK):
                    chunk = (problem.rows or [])[start : start + LINES_PER_CHUNK]
                    queue.put_nowait(b"".join(_encoder.encode(r) + b"\n" for r in chunk))
                await audit(problem.status)
                retry = headers.get("Retry-After")
                emit(
                    ImportFailed(
                        status=problem.status,
                        title=problem.title,
                        detail=problem.detail,
                        errors=problem.errors,
                        rows_total=problem.rows_total,
                        retry_after_s=int(retry) if retry else None,
                    )
                )
                return
            await audit(201)
            emit(ImportDone(created=len(rows), credentials=credentials))
            for start in range(0, len(secrets_), LINES_PER_CHUNK):
                queue.put_nowait(
                    b"".join(
                        _encoder.encode(ImportCredential(r.id, r.id, secret)) + b"\n"
                        for r, secret in zip(
                            rows[start : start + LINES_PER_CHUNK],
                            secrets_[start : start + LINES_PER_CHUNK],
                            strict=True,
                        )
                    )
                )
        finally:
            self.running.release(tenant.principal.subject)
            queue.put_nowait(None)

    async def _import(
        self, tenant: TenantScope, data: bytes, content_type: str, credentials: bool, progress: Progress
    ) -> tuple[list[ParsedRow], list[str]]:
        """The import (the caller holds the principal's slot): its rows and, with ``credentials``, each
        one's secret; each phase is told to ``progress`` as it passes."""
        # Reading 100,000 rows takes a few CPU seconds: in a thread, so that the event loop keeps serving
        # the process's other requests meanwhile.
        rows, errors = await asyncio.to_thread(self.parse, data, content_type)
        read = len(rows) + len(errors)  # one error per row refused while reading
        progress(ImportParsed(rows=read))
        await asyncio.to_thread(self.check, rows, errors)
        progress(ImportValidated(rows=read, invalid=len({e.line for e in errors})))
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
            progress(ImportStored(rows=len(rows)))
            if broker is not None:
                total = len(rows)
                created.extend(
                    await broker.provision_many(
                        [(r.id, s) for r, s in zip(rows, secrets_, strict=True)],
                        progress=lambda done: progress(ImportBroker(done=done, total=total)),
                    )
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
        return rows, secrets_

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


async def _lines(queue: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    """What a streamed import put in ``queue``, until its end (``None``)."""
    while (chunk := await queue.get()) is not None:
        yield chunk
