"""``/api/v1/alert-rules`` (rules ingest evaluates) and ``/api/v1/alerts`` (what they opened)."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromQuery, JSONBody, QueryParameter

from iot_api.controllers.params import PAGE, TIME_RANGE, AlertId, RuleId
from iot_api.problems import problem_responses
from iot_api.queries import PageRequest, TimeRange
from iot_api.schemas.alerts import (
    Alert,
    AlertPage,
    AlertRule,
    AlertRuleCreate,
    AlertRulePage,
    AlertRuleUpdate,
)
from iot_api.security import principal_of
from iot_api.state import AppServices
from iot_common.messages import AlertState, Severity
from iot_common.topics import DEVICE_ID_PATTERN, DEVICE_TYPE_PATTERN

DeviceFilter = Annotated[
    str | None, QueryParameter(pattern=DEVICE_ID_PATTERN, description="Only those of this device")
]
TypeFilter = Annotated[
    str | None, QueryParameter(pattern=DEVICE_TYPE_PATTERN, description="Only rules on this device type")
]
StateFilter = Annotated[AlertState | None, QueryParameter(name="state", description="open or resolved")]
Caller = Request[Any, Any, Any]


class AlertRuleController(Controller):
    path = "/api/v1/alert-rules"
    tags = ["alerts"]
    opt = {"scope": "read"}
    dependencies = {"page": PAGE}

    @get("/", operation_id="listAlertRules", responses=problem_responses())
    async def list_rules(
        self,
        services: AppServices,
        device_id: DeviceFilter = None,
        device_type: TypeFilter = None,
        enabled: FromQuery[bool | None] = None,
        *,
        page: NamedDependency[PageRequest],
    ) -> AlertRulePage:
        """Rules, newest first; a rule on a device type is not listed under ``device_id``."""
        return await services.alert_rules.list(
            page, device_id=device_id, device_type=device_type, enabled=enabled
        )

    @post("/", operation_id="createAlertRule", scope="write", responses=problem_responses(413))
    async def create_rule(
        self, services: AppServices, data: JSONBody[AlertRuleCreate], request: Caller
    ) -> AlertRule:
        """Create a rule; ingest replicas reload their rules at once (``{prefix}:rules-changed``). A webhook
        action needs the ``admin`` scope."""
        return await services.alert_rules.create(data, principal_of(request))

    @get("/{rule_id:str}", operation_id="getAlertRule", responses=problem_responses(404))
    async def get_rule(self, services: AppServices, rule_id: RuleId) -> AlertRule:
        """A rule; a webhook action shows the names of its headers (``header_names``), never their values."""
        return await services.alert_rules.get(rule_id)

    @patch(
        "/{rule_id:str}",
        operation_id="updateAlertRule",
        scope="write",
        responses=problem_responses(404, 413),
    )
    async def update_rule(
        self,
        services: AppServices,
        rule_id: RuleId,
        data: JSONBody[AlertRuleUpdate],
        request: Caller,
    ) -> AlertRule:
        """Change some fields of a rule; ingest replicas reload their rules at once. A rule with a webhook
        action, before or after the change, needs the ``admin`` scope; a webhook action sent without
        ``headers`` keeps the headers the rule has."""
        return await services.alert_rules.update(rule_id, data, principal_of(request))

    @delete("/{rule_id:str}", operation_id="deleteAlertRule", scope="write", responses=problem_responses(404))
    async def delete_rule(self, services: AppServices, rule_id: RuleId, request: Caller) -> None:
        """Delete a rule and, with it, its alerts; a rule with a webhook action needs the ``admin`` scope."""
        await services.alert_rules.delete(rule_id, principal_of(request))


class AlertController(Controller):
    path = "/api/v1/alerts"
    tags = ["alerts"]
    opt = {"scope": "read"}
    dependencies = {"page": PAGE, "span": TIME_RANGE}

    @get("/", operation_id="listAlerts", responses=problem_responses())
    async def list_alerts(
        self,
        services: AppServices,
        device_id: DeviceFilter = None,
        state_: StateFilter = None,
        severity: FromQuery[Severity | None] = None,
        *,
        span: NamedDependency[TimeRange],
        page: NamedDependency[PageRequest],
    ) -> AlertPage:
        """Alerts newest first by ``opened_at``, filtered by device, state, severity and opening time."""
        return await services.alerts.list(page, span, device_id=device_id, state=state_, severity=severity)

    @get("/{alert_id:str}", operation_id="getAlert", responses=problem_responses(404))
    async def get_alert(self, services: AppServices, alert_id: AlertId) -> Alert:
        return await services.alerts.get(alert_id)

    @post(
        "/{alert_id:str}/ack",
        operation_id="ackAlert",
        scope="write",
        status_code=200,
        responses=problem_responses(404),
    )
    async def ack_alert(self, services: AppServices, alert_id: AlertId, request: Caller) -> Alert:
        """Acknowledge an alert (open or resolved); again is a no-op that keeps the first ``acked_by``."""
        return await services.alerts.ack(alert_id, principal_of(request))
