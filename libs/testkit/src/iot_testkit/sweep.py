"""The arithmetic of a load sweep, kept apart from the processes so it can be tested: loss as differences
of sets of sequence numbers, and the knee (the highest offered rate still handled) found by bisection
between the points of a coarse grid.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Losses:
    """What went missing between the three places a message is seen."""

    lost_stored: int
    """PUBACKed by the broker but never stored."""
    lost_ws: int
    """Stored but never received by a WebSocket client."""
    stored_unacked: int
    """Stored although its PUBACK never reached the publisher (legal with QoS 1: the PUBACK, not the
    message, was lost). Counted apart: with ``acked - count(stored)`` such a message hides a lost one."""


def losses(acked: Iterable[int], stored: Iterable[int], received: Iterable[int]) -> Losses:
    """Loss by set differences of message sequence numbers (duplicates in any input count once)."""
    acked_set, stored_set, received_set = set(acked), set(stored), set(received)
    return Losses(
        lost_stored=len(acked_set - stored_set),
        lost_ws=len(stored_set - received_set),
        stored_unacked=len(stored_set - acked_set),
    )


def handled(offered: float, delivered_rate: float, p99_ms: float) -> bool:
    """A step is handled when it was delivered in full and on time: at least 95 % of the offered rate
    and a p99 delay under one second (beyond that, a backlog grows for as long as the load lasts)."""
    return offered > 0 and delivered_rate >= 0.95 * offered and p99_ms < 1000.0


def knee_bounds(results: Mapping[float, bool]) -> tuple[float, float | None]:
    """From grid results (offered rate -> handled), the bracket to bisect: the highest handled rate below
    the first failing one (0 when the lowest failed), and that first failing rate (``None`` when every
    rate was handled: the knee is then at least the top of the grid, and nothing is bisected)."""
    low = 0.0
    for rate in sorted(results):
        if not results[rate]:
            return low, rate
        low = rate
    return low, None


def bisect_knee(
    results: Mapping[float, bool],
    probe: Callable[[float], bool],
    *,
    resolution: float = 0.05,
    max_probes: int = 4,
    step: float = 100.0,
) -> tuple[float, list[float]]:
    """The knee by bisection between the grid points that bracket it (see :func:`knee_bounds`).

    ``probe(rate)`` runs one more step at ``rate`` and says whether it was handled. Stops when the bracket
    is narrower than ``resolution`` of its low end, or after ``max_probes`` probes; probed rates are
    rounded to multiples of ``step``. Returns the knee (the highest handled rate seen below the first
    failure) and the rates probed, in order.
    """
    low, high = knee_bounds(results)
    probed: list[float] = []
    if high is None:
        return low, probed
    while len(probed) < max_probes and high - low > max(step, resolution * low):
        mid = round((low + high) / 2 / step) * step
        if mid <= low or mid >= high:
            break
        probed.append(mid)
        if probe(mid):
            low = mid
        else:
            high = mid
    return low, probed


def cpu_us_per_message(cpu_seconds: Mapping[str, float], groups: Collection[str], delivered: int) -> float:
    """CPU microseconds the ``groups`` of processes spent per delivered message (NaN when none was)."""
    if delivered <= 0:
        return float("nan")
    return sum(cpu_seconds.get(g, 0.0) for g in groups) / delivered * 1e6
