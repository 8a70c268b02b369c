"""Alert rules evaluated on each stored reading, without a database round trip per reading.

Pure and deterministic: :class:`RuleEngine` takes readings and returns transitions (an alert opens or
resolves); the caller stores and publishes them. Per rule and device the engine is ``idle``, ``pending``
(the condition holds but not yet for ``for_seconds``) or ``open``. An open alert resolves only when the
value leaves the threshold by more than the rule's ``hysteresis``, so a value flapping around the
threshold opens no storm of alerts.

Rules belong to a tenant and see only its devices: a rule on a device type (or on every device) applies
to the devices of that type in the rule's tenant, and a rule naming a device applies only while that
device is in the rule's tenant.

Several ingest replicas each run an engine. They keep one view of each (rule, device) by exchanging the
notes :meth:`RuleEngine.evaluate_all` returns beside the transitions (``pending``: a ``for_seconds`` wait
started; ``clear``: it was reset) and applying each other's with :meth:`RuleEngine.apply_remote`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from iot_common.alerts import Op

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclass(frozen=True)
class Rule:
    id: str
    tenant_id: str
    metric: str
    op: Op
    threshold: float
    device_id: str | None = None
    device_type: str | None = None
    for_seconds: int = 0
    hysteresis: float = 0.0
    severity: str = "warning"
    message: str = ""
    action: Mapping[str, Any] | None = None

    def holds(self, value: float) -> bool:
        return OPERATORS[self.op](value, self.threshold)

    def cleared(self, value: float) -> bool:
        """Whether ``value`` is far enough from the threshold to resolve an open alert."""
        h = self.hysteresis
        if self.op in (">", ">="):
            return value < self.threshold - h if h else not self.holds(value)
        if self.op in ("<", "<="):
            return value > self.threshold + h if h else not self.holds(value)
        if self.op == "==":
            return abs(value - self.threshold) > h
        return not self.holds(value)


Kind = Literal["open", "resolve", "pending", "clear"]


@dataclass(frozen=True)
class Transition:
    """A change of one (rule, device): ``open``/``resolve`` an alert, or the notes ``pending``/``clear``."""

    kind: Kind
    rule: Rule
    device_id: str
    value: float
    ts: datetime


@dataclass
class _State:
    pending_since: datetime | None = None


@dataclass
class RuleEngine:
    """Rules indexed by device, and by tenant and device type; which alerts are open is given by
    ``open_alerts``."""

    rules: list[Rule] = field(default_factory=list)
    open_alerts: set[tuple[str, str]] = field(default_factory=set)
    _by_device: dict[str, list[Rule]] = field(default_factory=dict, init=False)
    _by_type: dict[tuple[str, str], list[Rule]] = field(default_factory=dict, init=False)
    _by_tenant: dict[str, list[Rule]] = field(default_factory=dict, init=False)
    _states: dict[tuple[str, str], _State] = field(default_factory=dict, init=False)
    _rule_ids: set[str] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        self.replace_rules(self.rules)

    def replace_rules(self, rules: Iterable[Rule]) -> None:
        """Install a new rule set (after a change); pending states of removed rules are forgotten."""
        self.rules = list(rules)
        self._by_device, self._by_type, self._by_tenant = {}, {}, {}
        for rule in self.rules:
            if rule.device_id is not None:
                self._by_device.setdefault(rule.device_id, []).append(rule)
            elif rule.device_type is not None:
                self._by_type.setdefault((rule.tenant_id, rule.device_type), []).append(rule)
            else:
                self._by_tenant.setdefault(rule.tenant_id, []).append(rule)
        ids = self._rule_ids = {r.id for r in self.rules}
        self._states = {k: v for k, v in self._states.items() if k[0] in ids}
        self.open_alerts = {k for k in self.open_alerts if k[0] in ids}

    def rules_for(self, tenant_id: str, device_id: str, device_type: str | None) -> list[Rule]:
        """The rules of ``tenant_id`` that apply to a device of that tenant."""
        found: list[Rule] = []
        by_device = self._by_device.get(device_id)
        if by_device:
            found = [r for r in by_device if r.tenant_id == tenant_id]
        by_type = self._by_type.get((tenant_id, device_type)) if device_type is not None else None
        if by_type:
            found += by_type
        by_tenant = self._by_tenant.get(tenant_id)
        if by_tenant:
            found += by_tenant
        return found

    def evaluate(
        self,
        tenant_id: str,
        device_id: str,
        device_type: str | None,
        ts: datetime,
        metrics: Mapping[str, float | str],
    ) -> list[Transition]:
        """Advance every rule of this device (of ``tenant_id``) with one reading; return what opened or
        resolved."""
        transitions = self.evaluate_all(tenant_id, device_id, device_type, ts, metrics)
        return [t for t in transitions if t.kind in _ALERT_KINDS]

    def evaluate_all(
        self,
        tenant_id: str,
        device_id: str,
        device_type: str | None,
        ts: datetime,
        metrics: Mapping[str, float | str],
    ) -> list[Transition]:
        """Like :meth:`evaluate`, with the ``pending``/``clear`` notes of ``for_seconds`` rules too."""
        out = []
        for rule in self.rules_for(tenant_id, device_id, device_type):
            value = metrics.get(rule.metric)
            if value is None or isinstance(value, str):
                continue
            key = (rule.id, device_id)
            if key in self.open_alerts:
                if rule.cleared(value):
                    self.open_alerts.discard(key)
                    self._states.pop(key, None)
                    out.append(Transition("resolve", rule, device_id, value, ts))
                continue
            if not rule.holds(value):
                if self._states.pop(key, None) is not None and rule.for_seconds:
                    out.append(Transition("clear", rule, device_id, value, ts))
                continue
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = _State(ts)
                if rule.for_seconds:
                    out.append(Transition("pending", rule, device_id, value, ts))
            elif state.pending_since is None or ts < state.pending_since:
                state.pending_since = ts
            assert state.pending_since is not None
            if (ts - state.pending_since).total_seconds() >= rule.for_seconds:
                self.open_alerts.add(key)
                self._states.pop(key, None)
                out.append(Transition("open", rule, device_id, value, ts))
        return out

    def set_open_alerts(self, keys: Iterable[tuple[str, str]]) -> None:
        """Take the open alerts from the database: (rule id, device id) pairs of known rules."""
        self.open_alerts = {k for k in keys if k[0] in self._rule_ids}
        for key in self.open_alerts:
            self._states.pop(key, None)

    def apply_remote(self, kind: Kind, rule_id: str, device_id: str, ts: datetime) -> None:
        """Apply a change another replica saw, so that this one judges the next readings the same way."""
        if rule_id not in self._rule_ids:
            return
        key = (rule_id, device_id)
        if kind == "open":
            self.open_alerts.add(key)
            self._states.pop(key, None)
        elif kind == "resolve":
            self.open_alerts.discard(key)
            self._states.pop(key, None)
        elif kind == "pending":
            if key not in self.open_alerts:
                state = self._states.setdefault(key, _State(ts))
                if state.pending_since is None or ts < state.pending_since:
                    state.pending_since = ts
        else:
            pending = self._states.get(key)
            if pending is not None and (pending.pending_since is None or pending.pending_since <= ts):
                del self._states[key]


_ALERT_KINDS: frozenset[str] = frozenset({"open", "resolve"})
