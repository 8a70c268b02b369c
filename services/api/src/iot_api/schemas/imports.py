"""Bulk provisioning: a row of an NDJSON import, and the answer of an import without credentials."""

from __future__ import annotations

from typing import Any

import msgspec


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
