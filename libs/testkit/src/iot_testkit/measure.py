"""Measuring: percentiles of delays or latencies, and per-process CPU and memory (psutil)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import psutil


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-quantile (0 <= q <= 1) by nearest rank, NaN when there is no value. Sorting an already
    sorted list is linear, so callers need not keep their own sorted copy."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """User + system CPU seconds of each of these processes that still runs, keyed by pid, and under
    ``-pid`` the CPU of its children that have exited and been waited for (a PostgreSQL server's exited
    backends and autovacuum workers, counted by their postmaster)."""
    found = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            found[pid] = t.user + t.system
            found[-pid] = t.children_user + t.children_system
    return found


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two :func:`cpu_seconds` readings. A process in both counts its
    difference; one only in ``after`` started in between, so all its time counts (a PostgreSQL backend a
    pool opened under load). One only in ``before`` exited in between: when a process of the readings
    (its parent) has waited for exited children meanwhile, their whole lives are in that parent's
    children time, so the part ``before`` already held is taken back out; otherwise its last stretch is
    lost (it must not count as negative time). Without that, a backend that asyncpg replaced during a step
    (after 50,000 queries) took its last stretch along. What is taken back is at most what the children
    time grew by: a process that exited between the reading of its parent and its own is in neither
    reading, and must not take away time another child brought."""
    used = sum(t - before.get(pid, 0.0) for pid, t in after.items() if pid > 0)
    reaped = sum(t - before.get(pid, 0.0) for pid, t in after.items() if pid < 0)
    exited = sum(t for pid, t in before.items() if pid > 0 and pid not in after)
    return used + reaped - min(exited, reaped)


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory (``VmRSS``), or its peak so far (``field="VmHWM"``), in MiB; 0 when it
    has exited."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def postgres_aux_pids() -> list[int]:
    """The server-wide PostgreSQL processes that work for every database (WAL writer, checkpointer...)."""
    names = ("walwriter", "checkpointer", "background writer")
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith("postgres:") and any(n in cmd for n in names):
            pids.append(proc.pid)
    return pids
