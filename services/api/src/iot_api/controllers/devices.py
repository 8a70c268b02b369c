"""``/api/v1/devices`` and its alias ``/api/v1/device/list``."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromQuery, JSONBody, QueryParameter
from litestar.response import Stream

from iot_api.audit import audit_recorder, defer_audit
from iot_api.controllers.params import PAGE, DeviceIdPath
from iot_api.problems import problem_responses
from iot_api.queries import PageRequest
from iot_api.schemas.devices import Device, DeviceCreate, DevicePage, DeviceUpdate
from iot_api.schemas.identity import DeviceCreated
from iot_api.schemas.imports import ImportLine, ImportResult
from iot_api.services.imports import STREAM_MEDIA_TYPE
from iot_api.state import AppServices
from iot_api.tenancy import Tenant
from iot_common.messages import DeviceStatus
from iot_common.topics import DEVICE_TYPE_PATTERN

TypeFilter = Annotated[
    str | None,
    QueryParameter(name="type", pattern=DEVICE_TYPE_PATTERN, description="Only devices of this type"),
]
Search = Annotated[
    str | None,
    QueryParameter(
        max_length=200, pattern=r"^[^\x00]*$", description="Case-insensitive substring of name or id"
    ),
]


def _accepts_stream(accept: str) -> bool:
    """The client asks for the streamed answer of an import: ``Accept`` names ``application/x-ndjson``
    (not with ``q=0``; ``*/*`` does not name it: the plain answer stays the default)."""
    for part in accept.split(","):
        media, *params = part.split(";")
        if media.strip().lower() != STREAM_MEDIA_TYPE:
            continue
        weights = [p.strip()[2:] for p in params if p.strip().lower().startswith("q=")]
        try:
            return not weights or float(weights[0]) > 0
        except ValueError:
            return False
    return False


class DeviceController(Controller):
    path = "/api/v1"
    tags = ["devices"]
    opt = {"permission": "read"}
    dependencies = {"page": PAGE}

    async def _list_devices(
        self,
        services: AppServices,
        tenant: Tenant,
        *,
        type_: TypeFilter = None,
        page: NamedDependency[PageRequest],
        status: FromQuery[DeviceStatus | None] = None,
        q: Search = None,
    ) -> DevicePage:
        return await services.devices.list(tenant, page, type_=type_, status=status, search=q)

    # One handler on two paths: the alias is the path the platform's data-flow document names.
    list_devices = get(
        "/devices",
        operation_id="listDevices",
        description="Devices ordered by id, filtered by type, status and a search on name or id.",
        responses=problem_responses(),
    )(_list_devices)
    list_devices_alias = get(
        "/device/list",
        operation_id="listDevicesAlias",
        summary="ListDevicesAlias",
        description="Same as ``GET /api/v1/devices`` (the path the platform's data-flow document names).",
        responses=problem_responses(),
    )(_list_devices)

    @post(
        "/devices",
        operation_id="createDevice",
        permission="write",
        responses=problem_responses(409, 413, 503),
    )
    async def create_device(
        self, services: AppServices, tenant: Tenant, data: JSONBody[DeviceCreate]
    ) -> DeviceCreated:
        """Register a device in the caller's tenant; 409 when the id is taken (device ids are unique across
        tenants; the answer does not say whose it is) or the tenant's device limit is reached. ``mqtt`` holds
        its MQTT credentials, shown once."""
        return await services.identity.register(tenant, data)

    @post(
        "/devices/import",
        operation_id="importDevices",
        permission="write",
        status_code=201,
        request_max_body_size=None,  # IOT_API_IMPORT_MAX_BYTES, checked while reading
        responses={
            **problem_responses(409, 413, 503),
            201: ResponseSpec(
                data_container=ImportResult,
                description=(
                    "Every device was stored. With `credentials=true` the answer is instead `text/csv`"
                    " (`id,username,password`, one line per device, shown once)."
                ),
                generate_examples=False,
            ),
            200: ResponseSpec(
                data_container=ImportLine,
                media_type=STREAM_MEDIA_TYPE,
                description=(
                    "With `Accept: application/x-ndjson`: the import's progress, one JSON object a line (a"
                    " phase; the refused rows before `failed`; the credentials after `done`). The status is"
                    " sent before the outcome is known: only the last phase, `done` or `failed`, tells it."
                ),
                generate_examples=False,
            ),
        },
    )
    async def import_devices(
        self,
        services: AppServices,
        tenant: Tenant,
        request: Request[Any, Any, Any],
        credentials: Annotated[
            bool,
            QueryParameter(description="Issue MQTT credentials; the answer is the CSV id,username,password"),
        ] = False,
    ) -> Response[Any]:
        """Register up to 100,000 devices from a CSV (``text/csv``: header ``id,name,type`` and attribute
        columns) or NDJSON (``application/x-ndjson``) body, all or none: with any wrong row the answer is 422
        and ``rows`` names each (line, id, field, reason); nothing is stored. With ``credentials=true`` the
        answer is ``text/csv`` ``id,username,password``, shown once; else ``{"imported": n}``.

        With ``Accept: application/x-ndjson`` the answer is a stream (status 200, sent before the outcome is
        known) of JSON lines: ``{"phase": "parsed"}``, ``validated``, ``stored``, ``broker`` (per batch
        of broker users), then ``{"phase": "done", "created": n}`` followed, with ``credentials=true``, by
        one ``{"id", "username", "password"}`` line per device (shown once); or the refused rows (``line``,
        ``id``, ``field``, ``reason``) and ``{"phase": "failed", "status": ...}``, the problem the plain
        answer would have been; nothing is stored then. Only the last line says whether it succeeded."""
        body = await services.imports.read_body(request.stream(), request.content_length)
        if _accepts_stream(request.headers.get("accept", "")):
            content_type = request.headers.get("content-type", "")
            services.imports.media_of(content_type)  # a 422 while it can still be one
            lines = services.imports.stream_import(
                tenant,
                body,
                content_type,
                credentials=credentials,
                instance=request.url.path,
                request_id=request.scope.get("state", {}).get("request_id"),
                audit=audit_recorder(request, tenant),
            )
            defer_audit(request)  # recorded when the import ends, with its outcome
            return Stream(
                lines,
                status_code=200,
                media_type=STREAM_MEDIA_TYPE,
                headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
            )
        result, table = await services.imports.import_devices(
            tenant, body, request.headers.get("content-type", ""), credentials=credentials
        )
        if table is not None:
            return Response(
                table,
                status_code=201,
                media_type="text/csv; charset=utf-8",
                headers={
                    "Cache-Control": "no-store",
                    "Content-Disposition": "attachment; filename=credentials.csv",
                },
            )
        return Response(result, status_code=201)

    @get("/devices/{device_id:str}", operation_id="getDevice", responses=problem_responses(404))
    async def get_device(self, services: AppServices, tenant: Tenant, device_id: DeviceIdPath) -> Device:
        return await services.devices.get(tenant, device_id)

    @patch(
        "/devices/{device_id:str}",
        operation_id="updateDevice",
        permission="write",
        responses=problem_responses(404, 413),
    )
    async def update_device(
        self, services: AppServices, tenant: Tenant, device_id: DeviceIdPath, data: JSONBody[DeviceUpdate]
    ) -> Device:
        return await services.devices.update(tenant, device_id, data)

    @delete(
        "/devices/{device_id:str}",
        operation_id="deleteDevice",
        permission="write",
        responses=problem_responses(404, 503),
    )
    async def delete_device(self, services: AppServices, tenant: Tenant, device_id: DeviceIdPath) -> None:
        """Delete the device, its MQTT credentials and its telemetry (a later device with the same id, in
        any tenant, starts with no history)."""
        await services.identity.delete_device(tenant, device_id)
        await services.state.forget(device_id)
