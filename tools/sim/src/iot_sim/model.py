"""Realistic metric values: a slow mean-reverting drift plus noise, with occasional spikes.

Pure and seeded, so tests and benchmarks get the same series for the same seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MetricSpec:
    name: str
    mean: float
    drift: float
    noise: float
    spike: float
    decimals: int = 2


KNOWN_METRICS = (
    MetricSpec("temperature", 21.0, 0.05, 0.1, 40.0),
    MetricSpec("humidity", 45.0, 0.1, 0.3, 40.0),
    MetricSpec("pressure", 1013.0, 0.05, 0.2, 50.0, 1),
    MetricSpec("battery", 90.0, 0.01, 0.05, -60.0, 1),
    MetricSpec("co2", 600.0, 2.0, 5.0, 1500.0, 0),
)
UNITS = {"temperature": "°C", "humidity": "%", "pressure": "hPa", "battery": "%", "co2": "ppm"}
"""The units of the known metrics, registered as the devices' ``attributes.units`` (dashboards show them)."""


STEER = 0.1
"""Share of the gap between a metric's mean and its target closed at each sample."""


def metric_specs(count: int) -> list[MetricSpec]:
    """The first ``count`` known metrics, then generic ``metric_N`` ones."""
    specs = list(KNOWN_METRICS[:count])
    for i in range(len(specs), count):
        specs.append(MetricSpec(f"metric_{i}", 50.0, 0.2, 1.0, 100.0))
    return specs


@dataclass
class DeviceModel:
    """One device's metrics; :meth:`sample` advances them one step."""

    specs: list[MetricSpec]
    rng: random.Random
    spike_probability: float = 0.002
    offsets: dict[str, float] = field(default_factory=dict)
    targets: dict[str, float] = field(default_factory=dict)
    """Desired values (device state, e.g. ``temperature`` from ``target_temperature``): the metric's
    mean moves towards its target by :data:`STEER` of the gap at each sample."""
    means: dict[str, float] = field(default_factory=dict)

    def sample(self) -> dict[str, float]:
        values = {}
        for spec in self.specs:
            offset = self.offsets.get(spec.name, 0.0)
            # Mean reversion keeps the drift bounded; noise is added on top of it.
            offset = offset * 0.995 + self.rng.gauss(0.0, spec.drift)
            self.offsets[spec.name] = offset
            mean = self.means.get(spec.name, spec.mean)
            target = self.targets.get(spec.name)
            if target is not None:
                mean += (target - mean) * STEER
                self.means[spec.name] = mean
            value = mean + offset + self.rng.gauss(0.0, spec.noise)
            if self.rng.random() < self.spike_probability:
                value += spec.spike
            values[spec.name] = round(value, spec.decimals)
        return values


def fleet(count: int, metrics: int, seed: int, spike_probability: float) -> list[DeviceModel]:
    specs = metric_specs(metrics)
    return [DeviceModel(specs, random.Random(seed * 1_000_003 + i), spike_probability) for i in range(count)]
