"""What the bodies of several resources share: short texts and the cursor page."""

from __future__ import annotations

from typing import Annotated

import msgspec

Text = Annotated[str, msgspec.Meta(max_length=200, pattern=r"^[^\x00]*$")]


class Page(msgspec.Struct, frozen=True):
    """Cursor pagination: pass ``next_cursor`` back as ``cursor`` while ``has_more`` is true."""

    has_more: bool
    next_cursor: str | None
