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


class Unauthenticated(DomainError):
    """No credential, or one that is malformed, expired, revoked or unknown."""


class Forbidden(DomainError):
    """The credential is valid but may not do this."""


class RateLimited(DomainError):
    """Too many requests or failures for now."""


class Unavailable(DomainError):
    """Something the operation needs (a store, the broker, a worker) cannot serve it now."""
