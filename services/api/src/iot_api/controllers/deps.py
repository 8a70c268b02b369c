"""Dependencies handed to handlers: the services built once in the lifespan (see ``iot_api.app``)."""

from __future__ import annotations

from dataclasses import dataclass

from litestar.datastructures import State
from litestar.di import Provide

from iot_api.repositories.rejects import RejectRepository
from iot_api.services.alerts import AlertRuleService, AlertService
from iot_api.services.auth import AuthService
from iot_api.services.commands import CommandService
from iot_api.services.devices import DeviceService
from iot_api.services.telemetry import TelemetryService


@dataclass(frozen=True)
class Services:
    devices: DeviceService
    telemetry: TelemetryService
    auth: AuthService
    rejects: RejectRepository
    alert_rules: AlertRuleService
    alerts: AlertService
    commands: CommandService


def _services(state: State) -> Services:
    services: Services = state.services
    return services


def provide_devices(state: State) -> DeviceService:
    return _services(state).devices


def provide_telemetry(state: State) -> TelemetryService:
    return _services(state).telemetry


def provide_auth(state: State) -> AuthService:
    return _services(state).auth


def provide_rejects(state: State) -> RejectRepository:
    return _services(state).rejects


def provide_alert_rules(state: State) -> AlertRuleService:
    return _services(state).alert_rules


def provide_alerts(state: State) -> AlertService:
    return _services(state).alerts


def provide_commands(state: State) -> CommandService:
    return _services(state).commands


DEVICES = Provide(provide_devices, sync_to_thread=False)
TELEMETRY = Provide(provide_telemetry, sync_to_thread=False)
AUTH = Provide(provide_auth, sync_to_thread=False)
REJECTS = Provide(provide_rejects, sync_to_thread=False)
ALERT_RULES = Provide(provide_alert_rules, sync_to_thread=False)
ALERTS = Provide(provide_alerts, sync_to_thread=False)
COMMANDS = Provide(provide_commands, sync_to_thread=False)
