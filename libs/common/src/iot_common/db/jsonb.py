"""What a jsonb column can store: PostgreSQL refuses the NUL character in its text."""

from __future__ import annotations

from typing import Any


def unstorable_json(value: Any, path: str) -> tuple[str, str] | None:
    """The place (``path.key[index]``) and the reason a JSON value cannot be stored as jsonb, else None."""
    if isinstance(value, str):
        return (path, "must not contain NUL characters") if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in key:
                return path, "keys must not contain NUL characters"
            if problem := unstorable_json(item, f"{path}.{key}"):
                return problem
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if problem := unstorable_json(item, f"{path}[{index}]"):
                return problem
    return None
