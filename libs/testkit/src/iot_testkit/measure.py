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
    """User + system CPU seconds of each of these processes that still runs."""
    found = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            found[pid] = t.user + t.system
    return found


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two :func:`cpu_seconds` readings. A process in both counts its
    difference; one only in ``after`` started in between, so all its time counts (a PostgreSQL backend a
    pool opened under load); one only in ``before`` exited in between and its last stretch is lost (it
    must not count as negative time)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


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
