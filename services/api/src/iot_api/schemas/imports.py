"""Bulk provisioning: a row of an NDJSON import, and the answer of an import without credentials."""

from __future__ import annotations

from typing import Any

import msgspec

from iot_api.problems import FieldError, RowProblem


class ImportRow(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One line of an NDJSON import, as the body of ``POST /api/v1/devices`` but ``id`` is required (the
    fields are checked after decoding, so that each wrong row is reported with its reason)."""

    id: str
    name: str = ""
    type: str = "generic"
    attributes: dict[str, Any] = msgspec.field(default_factory=dict)


class ImportResult(msgspec.Struct, frozen=True):
    """Every device of the body was stored (an import is all or nothing)."""

    imported: int
    credentials: bool


# The streamed answer (``Accept: application/x-ndjson``): one JSON object a line. A line with ``phase`` tells
# how far the import is; the lines without are data: the refused rows (before ``failed``, as the ``rows`` of
# the 422 problem) and the credentials (after ``done``, as the CSV of the plain answer).


class ImportParsed(msgspec.Struct, frozen=True, tag_field="phase", tag="parsed"):
    """The body was read: ``rows`` devices (the refused ones included)."""

    rows: int


class ImportValidated(msgspec.Struct, frozen=True, tag_field="phase", tag="validated"):
    """Every row was checked; ``invalid`` of them are wrong (then the import fails, nothing is stored)."""

    rows: int
    invalid: int


class ImportStored(msgspec.Struct, frozen=True, tag_field="phase", tag="stored"):
    """The devices are written in the import's transaction (committed with ``done``, not before)."""

    rows: int


class ImportBroker(msgspec.Struct, frozen=True, tag_field="phase", tag="broker"):
    """With Mosquitto's dynamic security: ``done`` of ``total`` broker users created (in the transaction)."""

    done: int
    total: int


class ImportDone(msgspec.Struct, frozen=True, tag_field="phase", tag="done"):
    """Committed: every device is stored; with ``credentials``, one line per device follows, shown once."""

    created: int
    credentials: bool


class ImportFailed(msgspec.Struct, frozen=True, tag_field="phase", tag="failed", omit_defaults=True):
    """Nothing was imported. ``status``, ``title``, ``detail`` and ``errors`` are those of the problem the
    plain answer would have been (422, 409, 503, ...); ``rows_total``: the refused rows (listed before,
    the first 1,000)."""

    status: int
    title: str
    detail: str
    errors: list[FieldError] = msgspec.field(default_factory=list)
    rows_total: int | None = None
    retry_after_s: int | None = None


ImportPhase = ImportParsed | ImportValidated | ImportStored | ImportBroker | ImportDone | ImportFailed
"""A line of the streamed answer that tells a phase (``phase``: its name)."""


class ImportCredential(msgspec.Struct, frozen=True):
    """A device's MQTT credentials in the streamed answer of ``credentials=true`` (after ``done``)."""

    id: str
    username: str
    password: str


ImportLine = ImportPhase | RowProblem | ImportCredential
"""Any line of the streamed answer: a phase, a refused row (before ``failed``) or a device's credentials
(after ``done``)."""
