"""The one builder of dynamic SQL: numbered arguments, optional filters, keyset positions, SET lists.

Column names always come from the code, never from a client; every value goes in as an argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class Query:
    """The arguments (``$1``...) and the WHERE clauses of one statement."""

    def __init__(self, *args: Any) -> None:
        self.args: list[Any] = list(args)
        self.clauses: list[str] = []

    def arg(self, value: Any) -> str:
        """Add ``value`` as the next argument; its placeholder."""
        self.args.append(value)
        return f"${len(self.args)}"

    def where(self, clause: str) -> None:
        self.clauses.append(clause)

    def equals(self, column: str, value: Any) -> None:
        """Keep the rows whose ``column`` is ``value``; no filter when ``value`` is None."""
        if value is not None:
            self.where(f"{column} = {self.arg(value)}")

    def between(self, column: str, start: Any, end: Any) -> None:
        """``start <= column < end``; either bound may be None (open)."""
        if start is not None:
            self.where(f"{column} >= {self.arg(start)}")
        if end is not None:
            self.where(f"{column} < {self.arg(end)}")

    def after(self, columns: tuple[str, ...], position: tuple[Any, ...] | None, *, descending: bool) -> None:
        """Keyset paging: the rows past ``position`` in the order of ``columns`` (no filter without one)."""
        if position is None:
            return
        op = "<" if descending else ">"
        if len(columns) == 1:
            self.where(f"{columns[0]} {op} {self.arg(position[0])}")
            return
        placeholders = ", ".join(self.arg(value) for value in position)
        self.where(f"({', '.join(columns)}) {op} ({placeholders})")

    def assignments(self, changes: Mapping[str, Any]) -> str:
        """``column = $n, ...`` for an UPDATE, the values added as arguments."""
        return ", ".join(f"{column} = {self.arg(value)}" for column, value in changes.items())

    def sql(self) -> str:
        """The WHERE part (empty without clauses)."""
        return f"WHERE {' AND '.join(self.clauses)}" if self.clauses else ""
