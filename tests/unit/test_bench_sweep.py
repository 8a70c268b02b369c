"""The benchmark's loss and knee arithmetic (iot_testkit.sweep)."""

from __future__ import annotations

import math
import os

import pytest

from iot_testkit.sweep import Losses, bisect_knee, cpu_us_per_message, handled, knee_bounds, losses


def test_loss_is_a_set_difference_so_a_stored_unacked_message_does_not_hide_a_lost_one() -> None:
    # Message 3 was PUBACKed but never stored; message 9 was stored although its PUBACK was lost.
    # Counting (acked - stored) would say 0 lost.
    acked = [1, 2, 3, 4]
    stored = [1, 2, 4, 9]
    received = [1, 2, 4, 9]
    assert len(acked) - len(stored) == 0
    assert losses(acked, stored, received) == Losses(lost_stored=1, lost_ws=0, stored_unacked=1)


def test_loss_on_the_websocket_counts_stored_messages_not_received_and_ignores_duplicates() -> None:
    assert losses([1, 2, 3], [1, 2, 3], [1, 1, 1, 3]) == Losses(lost_stored=0, lost_ws=1, stored_unacked=0)
    assert losses([], [], []) == Losses(0, 0, 0)


def test_handled_needs_95_percent_delivered_and_p99_under_a_second() -> None:
    assert handled(10_000, 9_500, 999.0)
    assert not handled(10_000, 9_499, 10.0)
    assert not handled(10_000, 10_000, 1000.0)
    assert not handled(0, 0, 0)


def test_knee_bounds_bracket_the_first_failure() -> None:
    assert knee_bounds({1000: True, 5000: True, 10_000: False, 20_000: True}) == (5000, 10_000)
    assert knee_bounds({1000: False, 5000: True}) == (0.0, 1000)
    assert knee_bounds({1000: True, 5000: True}) == (5000, None)


def test_bisection_converges_on_the_true_knee() -> None:
    true_knee = 13_370.0
    calls: list[float] = []

    def probe(rate: float) -> bool:
        calls.append(rate)
        return rate <= true_knee

    knee, probed = bisect_knee(
        {1000: True, 10_000: True, 20_000: False}, probe, resolution=0.01, max_probes=10
    )
    assert probed == calls
    assert probed[0] == 15_000
    assert knee <= true_knee < knee + max(100, 0.01 * knee) * 2
    assert knee > 10_000


def test_bisection_is_bounded_and_needs_nothing_when_the_grid_never_failed() -> None:
    knee, probed = bisect_knee({1000: True, 10_000: True, 20_000: False}, lambda r: True, max_probes=3)
    assert probed == [15_000, 17_500, 18_800]
    assert knee == 18_800
    knee, probed = bisect_knee({1000: True, 5000: True}, lambda r: False)
    assert (knee, probed) == (5000, [])


def test_cpu_per_message_sums_the_named_groups_only() -> None:
    cpu = {"ingest": 0.5, "realtime": 0.25, "loadgen": 9.0}
    assert cpu_us_per_message(cpu, ("ingest", "realtime", "redis"), 10_000) == 75.0
    assert math.isnan(cpu_us_per_message(cpu, ("ingest",), 0))


def test_stamped_payload_carries_the_scheduled_time_not_the_write_time() -> None:
    import msgspec

    from iot_testkit.publisher import StampedPayload

    payload = StampedPayload(seq_offset=500, rate=1000.0)
    first = msgspec.json.decode(payload(0, 0))
    # Written at once, but scheduled one second later: the stamp says when it should have gone out, so a
    # late publisher shows up as delay instead of hiding it.
    later = msgspec.json.decode(payload(1000, 0))
    assert later["ts"] - first["ts"] == 1000.0
    assert later["metrics"]["seq"] == 1500


def test_cpu_used_counts_processes_started_in_between_and_never_negative_time() -> None:
    from iot_testkit.measure import cpu_used

    before = {1: 10.0, 2: 5.0}  # 2 exits in between
    after = {1: 12.5, 3: 0.75}  # 3 starts in between (a new backend): all its time is in the interval
    assert cpu_used(before, after) == 3.25


def test_cpu_used_counts_the_last_stretch_of_a_child_that_exited_and_was_waited_for() -> None:
    """A PostgreSQL backend (2, a child of the postmaster 1) exits in between: its whole life, 5.5 s,
    reaches the postmaster's children time; 5.0 s of it were before the first reading."""
    from iot_testkit.measure import cpu_seconds, cpu_used

    before = {1: 10.0, -1: 0.0, 2: 5.0, -2: 0.0}
    after = {1: 10.5, -1: 5.5, 3: 0.25, -3: 0.0}
    assert cpu_used(before, after) == 0.5 + 0.5 + 0.25
    # Backend 2 exited before the first reading of the postmaster and after that of itself: its life is in
    # neither; an autovacuum worker's 0.2 s reached the postmaster: never less than what was seen.
    assert cpu_used({1: 100.0, -1: 50.0, 2: 30.0}, {1: 100.1, -1: 50.2}) == pytest.approx(0.1)
    # A real process: its own time and its exited children's, each under its key.
    mine = cpu_seconds([os.getpid()])
    assert mine[os.getpid()] > 0
    assert mine[-os.getpid()] >= 0
