"""How ingest classifies PostgreSQL errors: retry the work, or blame the data (shared by the writer and
the alerts)."""

from __future__ import annotations

from typing import Final

import asyncpg

TRANSIENT_ERRORS: Final = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
)
"""Errors that a later attempt can get past: the work is retried as a whole."""

DATA_ERRORS: Final = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.exceptions.ProgramLimitExceededError,
)
"""Errors caused by some row written: retrying the same rows cannot help."""


def message_fault(exc: BaseException) -> bool:
    """Whether ``exc`` may come from one message's content, so that writing messages one by one finds it.

    Data errors do, and so does any error of the code that is not PostgreSQL's (a value the driver cannot
    encode, a fault on some odd message). Transient errors and PostgreSQL's other errors (a missing table, a
    permission) concern the whole batch: it is retried as is, never dropped.
    """
    if isinstance(exc, DATA_ERRORS):
        return True
    if isinstance(exc, (*TRANSIENT_ERRORS, asyncpg.PostgresError)):
        return False
    return isinstance(exc, Exception)
