"""Reading a service's Prometheus ``/metrics``: the one scraper of the tests and benchmarks."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(base: str) -> dict[str, float]:
    """Every sample of ``{base}/metrics``, keyed ``name`` or ``name{label=value,...}`` (labels sorted)."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=5).text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return samples


def metric(base: str, name: str) -> float:
    """One sample of ``{base}/metrics``, keyed as by :func:`scrape`; AssertionError if it is not there."""
    samples = scrape(base)
    if name not in samples:
        raise AssertionError(f"{name} not on {base}/metrics")
    return samples[name]
