"""What the API refuses, as domain exceptions that know nothing of HTTP.

Services, limits and the authentication layer raise these; :func:`iot_api.problems.problem_response`
maps each kind to its status and writes the problem-details body, in one place.
"""

from __future__ import annotations


class DomainError(Exception):
    """A refusal the client can act on; ``retry_after_s``: when trying again may succeed."""

    def __init__(self, detail: str = "", *, retry_after_s: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s


class NotFound(DomainError):
    """No such resource."""


class Conflict(DomainError):
    """The resource, or the name it would take, exists already."""


class PreconditionFailed(DomainError):
    """A conditional request (``If-Match``) names another version than the current one."""


class Invalid(DomainError):
    """One input is wrong: ``field`` names it, ``source`` says where it is (query, body, path, header)."""

    def __init__(self, field: str, message: str, source: str = "query") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.source = source


class RowError:
    """One refused row of an import: its line in the body, its id when it has one, the field and why."""

    __slots__ = ("field", "id", "line", "reason")

    def __init__(self, line: int, id_: str | None, field: str, reason: str) -> None:
        self.line = line
        self.id = id_
        self.field = field
        self.reason = reason


class RowsInvalid(Invalid):
    """Rows of an import are wrong (nothing was imported): ``rows`` lists each, ``total`` counts them."""

    def __init__(self, rows: list[RowError], total: int) -> None:
        super().__init__("body", f"{total} row(s) are invalid; nothing was imported", "body")
        self.detail = self.message
        self.rows = rows
        self.total = total


class TooLarge(DomainError):
    """The request body is larger than its limit."""


class Unauthenticated(DomainError):
    """No credential, or one that is malformed, expired, revoked or unknown."""


class Forbidden(DomainError):
    """The credential is valid but may not do this."""


class RateLimited(DomainError):
    """Too many requests or failures for now."""


class Unavailable(DomainError):
    """Something the operation needs (a store, the broker, a worker) cannot serve it now."""
