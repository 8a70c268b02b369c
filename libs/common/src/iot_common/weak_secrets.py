"""Secrets the platform refuses to start with: unset, too short, or published placeholders.

A secret that falls back to a default, or that was copied from an example, is known to anyone who read
this repository: with ``IOT_JWT_SECRET`` that means forging an admin token. This module is the one place
that lists the values published here (old defaults, the Kubernetes placeholder, the Compose examples); the
settings of each service check their secrets with :func:`weak_secret_problem`.
"""

from __future__ import annotations

import re

MIN_SECRET_BYTES = 32
"""Shortest signing secret accepted (HS256 keys shorter than its 32-byte output are weak)."""

PUBLISHED_SECRETS: frozenset[str] = frozenset(
    {
        # The former default of IOT_JWT_SECRET in libs/common (before it became required).
        "dev-only-insecure-jwt-secret-change-me",
        # The placeholder in deploy/k8s/base/secret.yaml.
        "REPLACE_ME_WITH_AT_LEAST_32_RANDOM_CHARACTERS",
        # The former fallbacks of deploy/compose.yml and scripts/run_local.py.
        "compose-dev-secret-change-me-0123456789",
        "compose-dev-admin-password",
        "compose-dev-ingest-password",
        "compose-dev-api-password",
        "compose-dev-sim-password",
        "admin-password",
    }
)
"""Exact values published in this repository (compared case-insensitively)."""

PLACEHOLDER_WORDS: tuple[str, ...] = (
    "changeme",
    "replaceme",
    "insecure",
    "placeholder",
    "devonly",
    "yoursecret",
    "secretgoeshere",
)
"""Words that mark an example value, compared with case and punctuation ignored ("change-me", "CHANGE_ME")."""

MIN_DISTINCT_CHARACTERS = 8
"""Fewer different characters than this ("0000...", "abababab...") is not a random secret."""

_NOT_ALNUM = re.compile(r"[^a-z0-9]")


def is_placeholder(value: str) -> bool:
    """Whether ``value`` is a published example or default, or reads like one (``changeme``...)."""
    folded = value.strip().lower()
    if folded in {s.lower() for s in PUBLISHED_SECRETS}:
        return True
    squeezed = _NOT_ALNUM.sub("", folded)
    return any(word in squeezed for word in PLACEHOLDER_WORDS)


def weak_secret_problem(value: str, min_bytes: int = MIN_SECRET_BYTES) -> str | None:
    """Why ``value`` must not be used as a secret, or ``None`` when it may.

    Empty means unset; then shorter than ``min_bytes`` bytes (UTF-8), a known placeholder, too few
    different characters.
    """
    if not value:
        return "is not set"
    if len(value.encode()) < min_bytes:
        return f"is shorter than {min_bytes} bytes"
    if is_placeholder(value):
        return "is a published placeholder or example value"
    if len(set(value)) < MIN_DISTINCT_CHARACTERS:
        return f"has fewer than {MIN_DISTINCT_CHARACTERS} different characters"
    return None
