"""Prometheus exposition shared by the services' ``/metrics`` endpoints."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest


def render_metrics(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The body and content type of a Prometheus scrape."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
