"""``/api/v1/alert-rules`` (rules ingest evaluates) and ``/api/v1/alerts`` (what they opened)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromQuery, JSONBody, QueryParameter

from iot_api.controllers.params import PAGE, TIME_RANGE, AlertId, RuleId
from iot_api.problems import problem_responses
from iot_api.queries import PageRequest, TimeRange
from iot_api.schemas.alerts import (
    Alert,
    AlertAck,
    AlertPage,
    AlertRule,
    AlertRuleCreate,
    AlertRulePage,
    AlertRuleUpdate,
)
from iot_api.state import AppServices
from iot_api.tenancy import Tenant
from iot_common.messages import AlertState, Severity
from iot_common.topics import DEVICE_ID_PATTERN, DEVICE_TYPE_PATTERN

DeviceFilter = Annotated[
    str | None, QueryParameter(pattern=DEVICE_ID_PATTERN, description="Only those of this device")
]
TypeFilter = Annotated[
    str | None, QueryParameter(pattern=DEVICE_TYPE_PATTERN, description="Only rules on this device type")
]
StateFilter = Annotated[AlertState | None, QueryParameter(name="state", description="open or resolved")]


class AlertRuleController(Controller):
    path = "/api/v1/alert-rules"
    tags = ["alerts"]
    opt = {"permission": "read"}
    dependencies = {"page": PAGE}

    @get("/", operation_id="listAlertRules", responses=problem_responses())
    async def list_rules(
        self,
        services: AppServices,
        tenant: Tenant,
        device_id: DeviceFilter = None,
        device_type: TypeFilter = None,
        enabled: FromQuery[bool | None] = None,
        *,
        page: NamedDependency[PageRequest],
    ) -> AlertRulePage:
        """Rules, newest first; a rule on a device type is not listed under ``device_id``."""
        return await services.alert_rules.list(
            tenant, page, device_id=device_id, device_type=device_type, enabled=enabled
        )

    @post("/", operation_id="createAlertRule", permission="write", responses=problem_responses(413))
    async def create_rule(
        self, services: AppServices, tenant: Tenant, data: JSONBody[AlertRuleCreate]
    ) -> AlertRule:
        """Create a rule; ingest replicas reload their rules at once (``{prefix}:rules-changed``). A webhook
        action needs the ``admin`` permission."""
        return await services.alert_rules.create(tenant, data)

    @get("/{rule_id:str}", operation_id="getAlertRule", responses=problem_responses(404))
    async def get_rule(self, services: AppServices, tenant: Tenant, rule_id: RuleId) -> AlertRule:
        """A rule; a webhook action shows the names of its headers (``header_names``), never their values."""
        return await services.alert_rules.get(tenant, rule_id)

    @patch(
        "/{rule_id:str}",
        operation_id="updateAlertRule",
        permission="write",
        responses=problem_responses(404, 413),
    )
    async def update_rule(
        self,
        services: AppServices,
        tenant: Tenant,
        rule_id: RuleId,
        data: JSONBody[AlertRuleUpdate],
    ) -> AlertRule:
        """Change some fields of a rule; ingest replicas reload their rules at once. A rule with a webhook
        action, before or after the change, needs the ``admin`` permission; a webhook action sent without
        ``headers`` keeps the headers the rule has."""
        return await services.alert_rules.update(tenant, rule_id, data)

    @delete(
        "/{rule_id:str}", operation_id="deleteAlertRule", permission="write", responses=problem_responses(404)
    )
    async def delete_rule(self, services: AppServices, tenant: Tenant, rule_id: RuleId) -> None:
        """Delete a rule and, with it, its alerts; a rule with a webhook action needs the ``admin``
        permission."""
        await services.alert_rules.delete(tenant, rule_id)


class AlertController(Controller):
    path = "/api/v1/alerts"
    tags = ["alerts"]
    opt = {"permission": "read"}
    dependencies = {"page": PAGE, "span": TIME_RANGE}

    @get("/", operation_id="listAlerts", responses=problem_responses())
    async def list_alerts(
        self,
        services: AppServices,
        tenant: Tenant,
        device_id: DeviceFilter = None,
        state_: StateFilter = None,
        severity: FromQuery[Severity | None] = None,
        *,
        span: NamedDependency[TimeRange],
        page: NamedDependency[PageRequest],
    ) -> AlertPage:
        """Alerts newest first by ``opened_at``, filtered by device, state, severity and opening time."""
        return await services.alerts.list(
            tenant, page, span, device_id=device_id, state=state_, severity=severity
        )

    @get("/{alert_id:str}", operation_id="getAlert", responses=problem_responses(404))
    async def get_alert(self, services: AppServices, tenant: Tenant, alert_id: AlertId) -> Alert:
        return await services.alerts.get(tenant, alert_id)

    @post(
        "/{alert_id:str}/ack",
        operation_id="ackAlert",
        permission="operate",
        status_code=200,
        responses=problem_responses(404),
    )
    async def ack_alert(
        self, services: AppServices, tenant: Tenant, alert_id: AlertId, data: JSONBody[AlertAck | None] = None
    ) -> Alert:
        """Acknowledge an alert (open or resolved), optionally with a note (``{"note": "..."}``, up to 500
        characters); again is a no-op that keeps the first ``acked_by`` and note."""
        return await services.alerts.ack(tenant, alert_id, data.note if data is not None else None)
