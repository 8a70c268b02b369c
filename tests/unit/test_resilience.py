"""The services' one way to retry and repeat: backoff delays, retries, periodic jobs, the MQTT connection."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from iot_common.mqtt import MqttConnection
from iot_common.resilience import Backoff, Stopped, retry, run_periodic

log = structlog.stdlib.get_logger("test")


def test_backoff_doubles_up_to_its_cap_and_starts_again_after_a_reset() -> None:
    backoff = Backoff(0.5, 4.0)
    assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.reset()
    assert backoff.next() == 0.5
    assert Backoff(0.5, 2.0, factor=4).delay(2) == 2.0
    assert Backoff(0.1, 5.0).delay(100_000) == 5.0  # no overflow however long the failures last


def test_backoff_jitter_stays_within_its_share_of_the_delay() -> None:
    backoff = Backoff(1.0, jitter=0.2)
    delays = [backoff.delay(3) for _ in range(200)]
    assert all(3.2 <= d <= 4.8 for d in delays)
    assert len(set(delays)) > 1


def test_backoff_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="initial_s"):
        Backoff(2.0, 1.0)


async def test_retry_retries_what_it_may_with_growing_delays_until_it_works() -> None:
    errors = [ConnectionResetError("lost"), TimeoutError("slow")]
    retried: list[tuple[str, float]] = []

    async def operation() -> str:
        if errors:
            raise errors.pop(0)
        return "done"

    result = await retry(
        operation,
        Backoff(0.001, 1.0),
        on_retry=lambda exc, delay: retried.append((type(exc).__name__, delay)),
    )
    assert result == "done"
    assert retried == [("ConnectionResetError", 0.001), ("TimeoutError", 0.002)]


async def test_retry_raises_what_it_may_not_retry_and_gives_up_after_its_attempts() -> None:
    calls = 0

    async def refused() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("bad data")

    with pytest.raises(ValueError, match="bad data"):
        await retry(refused, Backoff(0.001), retry_on=lambda exc: not isinstance(exc, ValueError))
    assert calls == 1
    with pytest.raises(ValueError, match="bad data"):
        await retry(refused, Backoff(0.001), attempts=3)
    assert calls == 4


async def test_a_retry_that_succeeds_at_once_frees_its_callbacks_without_the_cycle_collector() -> None:
    """Ingest retries every batch: before, tenacity's reference cycles kept each batch alive until a
    cycle collection, which then took up to 95 ms at 1,000 msg/s."""

    class Batch:
        pass

    enabled = gc.isenabled()
    gc.disable()
    try:
        batch = Batch()
        freed = weakref.ref(batch)

        async def operation() -> int:
            return 1

        def naming(batch: Batch) -> Callable[[Exception, float], None]:
            def on_retry(exc: Exception, delay: float) -> None:  # as ingest's: it names the batch
                log.warning("retrying", batch=batch, error=str(exc), delay=delay)

            return on_retry

        assert await retry(operation, Backoff(0.001), on_retry=naming(batch)) == 1
        del batch
        assert freed() is None
    finally:
        if enabled:
            gc.enable()


async def test_retry_stops_waiting_when_told_to_and_tries_no_more() -> None:
    stop = asyncio.Event()
    calls = 0

    async def unreachable() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionRefusedError("refused")

    with pytest.raises(Stopped):
        await retry(unreachable, Backoff(3600.0), on_retry=lambda *_: stop.set(), stop=stop)
    assert calls == 1
    with pytest.raises(Stopped):
        await retry(unreachable, Backoff(0.001), stop=stop)
    assert calls == 1


async def test_a_periodic_job_survives_its_failures_and_logs_once_per_run_of_them() -> None:
    outcomes: list[Exception | None] = [
        ConnectionResetError("db down"),
        ZeroDivisionError("a fault of the code"),
        None,
        None,
        OSError("down again"),
        None,
    ]
    done = asyncio.Event()

    async def job() -> None:
        if not outcomes:
            done.set()
            await asyncio.Event().wait()  # the last run hangs until the task is cancelled
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    with capture_logs() as logs:
        task = asyncio.create_task(run_periodic("device cache refresh", 0, job, log=log))
        await asyncio.wait_for(done.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    lines = [(e["event"], e.get("error") or e.get("failed_runs")) for e in logs]
    assert lines == [
        ("device cache refresh failed", "ConnectionResetError: db down"),
        ("device cache refresh recovered", 2),
        ("device cache refresh failed", "OSError: down again"),
        ("device cache refresh recovered", 1),
    ]


async def test_a_periodic_job_runs_first_at_once_when_asked_then_waits_its_interval() -> None:
    runs: list[int] = []
    ran = asyncio.Event()

    async def job() -> None:
        runs.append(1)
        ran.set()

    task = asyncio.create_task(run_periodic("partition maintenance", 3600, job, log=log, run_first=True))
    await asyncio.wait_for(ran.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert runs == [1]


class StopOnWarning:
    """A logger that records warnings and sets ``stop`` on the first."""

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self.warnings: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.warnings.append((event, fields))
        self.stop.set()

    def info(self, event: str, **fields: Any) -> None:
        pass


async def test_mqtt_connection_retries_its_first_connect_until_stopped() -> None:
    stop = asyncio.Event()
    logger = StopOnWarning(stop)
    connection = MqttConnection("mqtt://127.0.0.1:1", "unit-resilience", log=logger, clean_session=True)  # type: ignore[arg-type]
    assert await asyncio.wait_for(connection.connect(stop), 10) is False
    [(event, fields)] = logger.warnings
    assert (event, fields["retry_in_s"]) == ("mqtt connect failed, retrying", 0.1)
    assert not connection.is_connected
