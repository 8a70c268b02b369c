"""Errors as RFC 9457 problem details (``application/problem+json``), naming the field that is wrong.

Every 4xx the API sends has this shape, whether a service refused (a domain exception of
:mod:`iot_api.errors`), Litestar refused the input or the route does not exist; OpenAPI documents the same
struct through :func:`problem_responses`.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

import asyncpg
import msgspec
import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, NotAuthorizedException, ValidationException
from litestar.openapi.datastructures import ResponseSpec

from iot_api.errors import (
    Conflict,
    DomainError,
    Forbidden,
    Invalid,
    NotFound,
    PreconditionFailed,
    RateLimited,
    RowsInvalid,
    TooLarge,
    Unauthenticated,
    Unavailable,
)

PROBLEM_MEDIA_TYPE = "application/problem+json"
log = structlog.stdlib.get_logger("iot_api")


class FieldError(msgspec.Struct, frozen=True, omit_defaults=True):
    """One wrong input: where it is (``body``, ``query``, ``path``, ``header``), its name and why."""

    field: str
    message: str
    source: str | None = None


class RowProblem(msgspec.Struct, frozen=True, omit_defaults=True):
    """A refused row of an import: its line in the body (a CSV's header is line 1), id, field and why."""

    line: int
    field: str
    reason: str
    id: str | None = None


class Problem(msgspec.Struct, frozen=True, omit_defaults=True):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str = ""
    instance: str | None = None
    request_id: str | None = None
    errors: list[FieldError] = msgspec.field(default_factory=list)
    rows: list[RowProblem] | None = None
    """An import's refused rows (``POST /api/v1/devices/import``), the first ones when there are many."""
    rows_total: int | None = None


_STATUS: dict[type[DomainError], int] = {
    NotFound: 404,
    Conflict: 409,
    PreconditionFailed: 412,
    Invalid: 422,
    TooLarge: 413,
    Unauthenticated: 401,
    Forbidden: 403,
    RateLimited: 429,
    Unavailable: 503,
    DomainError: 400,
}
"""The status of each domain refusal (:mod:`iot_api.errors`)."""


_DATA_ERRORS = (
    asyncpg.DataError,
    asyncpg.exceptions._base.DataError,  # raised by asyncpg while encoding an argument
    asyncpg.CheckViolationError,
)

_MISSING_PARAM_RE = re.compile(r"Missing required (\w+) parameter '([^']+)'")
_MISSING_RE = re.compile(r"missing required field `([^`]+)`")


def _field_name(key: str, message: str) -> str:
    """The wrong field: msgspec reports a missing field on its parent object, we name the field itself."""
    key = key.rstrip("_")  # Python names of query parameters that are keywords: from_ -> from
    missing = _MISSING_RE.search(message)
    if missing is None:
        return key
    return missing.group(1) if key in ("data", "body") else f"{key}.{missing.group(1)}"


def _names_tenant(exc: asyncpg.ForeignKeyViolationError) -> bool:
    """A write refused because its tenant row is gone (``<table>_tenant_id_fkey``)."""
    return str(getattr(exc, "constraint_name", "") or "").endswith("_tenant_id_fkey")


def _type_uri(status: int) -> str:
    return f"https://iot-platform.dev/problems/{status}" if status >= 400 else "about:blank"


def problem_response(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    """Translate any exception raised while serving ``request`` into a problem-details response."""
    state = request.scope.get("state", {})
    problem, headers = problem_of(exc, request.url.path, state.get("request_id"))
    return Response(problem, status_code=problem.status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def problem_of(
    exc: Exception, instance: str | None, request_id: str | None
) -> tuple[Problem, dict[str, str]]:
    """The problem details (and headers) of any exception raised while serving a request: also for an
    answer that is already under way (a streamed import's last line)."""
    status = 500
    detail = ""
    errors: list[FieldError] = []
    headers: dict[str, str] = {}
    rows: list[RowProblem] | None = None
    rows_total: int | None = None
    if isinstance(exc, RowsInvalid):
        rows = [RowProblem(r.line, r.field, r.reason, r.id) for r in exc.rows]
        rows_total = exc.total
    if isinstance(exc, ValidationException):
        # Litestar refuses unparsable or out-of-schema input with 400; we say 422 and name the field.
        status = 422
        for item in exc.extra if isinstance(exc.extra, list) else []:
            if isinstance(item, dict):
                message = str(item.get("message", "invalid value"))
                errors.append(
                    FieldError(
                        field=_field_name(str(item.get("key") or "body"), message),
                        message=message,
                        source=str(getattr(item["source"], "value", item["source"]))
                        if item.get("source")
                        else None,
                    )
                )
        if any(e.source == "path" for e in errors):
            # A path that does not parse (an id that is no UUID, no device id) names nothing, whatever the
            # body says.
            status = 404
        missing_param = _MISSING_PARAM_RE.search(str(exc.detail))
        if missing_param is not None:
            name = missing_param.group(2)
            errors.append(FieldError(name, "required", missing_param.group(1)))
        detail = "; ".join(f"{e.field}: {e.message}" for e in errors) or str(exc.detail)
        if "JSON" in str(exc.detail) or "decode" in str(exc.detail).lower():
            status, detail = 400, "request body is not valid JSON"
    elif isinstance(exc, DomainError):
        status = next(code for kind, code in _STATUS.items() if isinstance(exc, kind))
        detail = exc.detail
        if isinstance(exc, Invalid):
            errors = [FieldError(exc.field, exc.message, exc.source)]
        if exc.retry_after_s is not None:
            headers["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, asyncpg.ForeignKeyViolationError) and _names_tenant(exc):
        # A token outlives its tenant by minutes at most: what it would write has no tenant any more.
        status, detail = 401, "the credential's tenant no longer exists"
    elif isinstance(exc, RecursionError):
        # msgspec (and anything recursive) gives up on input nested thousands deep: the input is at fault.
        status, detail = 400, "the input is nested too deeply"
    elif isinstance(exc, UnicodeDecodeError):
        status, detail = 400, "the input is not valid UTF-8"
    elif isinstance(exc, _DATA_ERRORS):
        # PostgreSQL (or asyncpg encoding an argument) refused a value the validation let through: a NUL
        # in text, an integer out of its column's range, a CHECK constraint. The request is at fault.
        log.warning("database refused a value", error=type(exc).__name__, message=str(exc)[:200])
        status, detail = 400, "a value is out of range or has characters that cannot be stored"
    elif isinstance(exc, HTTPException):
        status = exc.status_code
        detail = exc.detail if exc.detail != HTTPStatus(status).phrase else ""
        headers = dict(exc.headers or {})
        if isinstance(exc, NotAuthorizedException):
            detail = detail or "credentials required"
    if status == 500:
        # A bug or an unexpected failure (any exception not mapped above): its stack trace is what to look at.
        log.exception("request failed", exc_info=exc)
        detail = "internal error"
    elif status > 500:
        # Raised on purpose (shed load, a store down): one line, so that a flood does not flood the log.
        log.warning("request refused", status=status, detail=detail, error=type(exc).__name__)
    if status == 401:
        headers.setdefault("WWW-Authenticate", 'Bearer realm="iot", ApiKey header="X-API-Key"')
    problem = Problem(
        type=_type_uri(status),
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=instance,
        request_id=request_id,
        errors=errors,
        rows=rows,
        rows_total=rows_total,
    )
    return problem, headers


EXCEPTION_HANDLERS: dict[type[Exception] | int, Any] = {
    HTTPException: problem_response,
    Exception: problem_response,
}

_DESCRIPTIONS = {
    400: "The request could not be read (for example a body that is not JSON).",
    401: "No credential, or one that is malformed, expired, revoked or unknown.",
    403: "The credential lacks the permission this operation needs (or is not a platform admin's).",
    404: "The resource does not exist in the caller's tenant.",
    409: "A resource with this id or name already exists, or a limit of the tenant is reached.",
    412: "`If-Match` names another version than the current one; nothing was changed.",
    413: "The request body is larger than IOT_API_MAX_BODY_BYTES.",
    422: "An input is invalid; `errors` names each wrong field.",
    429: "Too many requests for this principal; retry after `Retry-After` seconds.",
    503: "A backing store the operation needs is unavailable.",
}


def problem_responses(*codes: int, public: bool = False) -> dict[int, ResponseSpec]:
    """OpenAPI responses for the given statuses, plus those every (authenticated) route can answer."""
    base = {400, 422, 429} if public else {400, 401, 403, 422, 429}
    return {
        code: ResponseSpec(
            data_container=Problem,
            description=_DESCRIPTIONS[code],
            media_type=PROBLEM_MEDIA_TYPE,
            generate_examples=False,
        )
        for code in sorted(base | set(codes))
    }
