#!/bin/sh
# The device simulator's broker user `sim`, on a running Mosquitto with the dynamic-security plugin.
# `sim` may publish telemetry, status and command acks for EVERY device: development only. Compose runs
#   dynsec-sim.sh remove  on every `up` (service `mosquitto-sim-off`), so the broker has no `sim` user,
#   dynsec-sim.sh add     under the `sim` profile only (service `mosquitto-sim-on`, after the removal).
# Both are idempotent; `add` (re)sets the password to MQTT_SIM_PASSWORD.
#
# Environment: MQTT_ADMIN_PASSWORD (required), MQTT_SIM_PASSWORD (required by `add`, 16+ characters),
# MQTT_HOST (default mosquitto), MQTT_PORT (default 1883).
set -eu

: "${MQTT_ADMIN_PASSWORD:?set IOT_MQTT_ADMIN_PASSWORD}"
HOST=${MQTT_HOST:-mosquitto}
PORT=${MQTT_PORT:-1883}
ACTION=${1:-}

# mosquitto_ctrl warns on stderr about an unencrypted connection and (2.0) exits 0 when the broker refuses
# the login or a command: success is recognised by what it prints, a refusal by an "error" line.
ctl() {
    if ! out=$(mosquitto_ctrl -h "$HOST" -p "$PORT" -u admin -P "$MQTT_ADMIN_PASSWORD" dynsec "$@" 2>&1); then
        echo "dynsec-sim: mosquitto_ctrl dynsec $1 failed: $out" >&2
        exit 1
    fi
    case $out in
        *[Ee]rror*)
            echo "dynsec-sim: mosquitto_ctrl dynsec $1 at $HOST:$PORT: $(printf '%s\n' "$out" | grep -i error)" >&2
            exit 1
            ;;
    esac
}

# exists getClient sim "Username: sim" | exists getRole service-sim "Rolename: service-sim"
exists() {
    out=$(mosquitto_ctrl -h "$HOST" -p "$PORT" -u admin -P "$MQTT_ADMIN_PASSWORD" dynsec "$1" "$2" 2>&1) || true
    case $out in
        *"$3"*) return 0 ;;
        *"not found"*) return 1 ;;
    esac
    echo "dynsec-sim: mosquitto_ctrl dynsec $1 at $HOST:$PORT: $(printf '%s\n' "$out" | grep -iv -e warning -e 'this means' | grep .)" >&2
    exit 1
}

case $ACTION in
    add)
        : "${MQTT_SIM_PASSWORD:?set IOT_MQTT_SIM_PASSWORD to run the sim profile (docs/deploy.md)}"
        if [ "${#MQTT_SIM_PASSWORD}" -lt 16 ]; then
            echo "dynsec-sim: IOT_MQTT_SIM_PASSWORD must have at least 16 characters" >&2
            exit 2
        fi
        if ! exists getRole service-sim "Rolename: service-sim"; then
            ctl createRole service-sim
            ctl addRoleACL service-sim publishClientSend 'devices/telemetry/+' allow
            ctl addRoleACL service-sim publishClientSend 'devices/status/+' allow
            ctl addRoleACL service-sim publishClientSend 'devices/commands/+/ack' allow
            ctl addRoleACL service-sim subscribePattern 'devices/commands/+' allow
            ctl addRoleACL service-sim publishClientReceive 'devices/commands/+' allow
            ctl addRoleACL service-sim publishClientSend 'devices/state/+/reported' allow
            ctl addRoleACL service-sim subscribePattern 'devices/state/+/desired' allow
            ctl addRoleACL service-sim publishClientReceive 'devices/state/+/desired' allow
        fi
        if exists getClient sim "Username: sim"; then
            ctl setClientPassword sim "$MQTT_SIM_PASSWORD"
        else
            ctl createClient sim -p "$MQTT_SIM_PASSWORD"
            ctl addClientRole sim service-sim
        fi
        echo "dynsec-sim: user sim present (development only: it may publish for every device)"
        ;;
    remove)
        if exists getClient sim "Username: sim"; then
            ctl deleteClient sim
            echo "dynsec-sim: user sim removed"
        else
            echo "dynsec-sim: no user sim, nothing to do"
        fi
        ;;
    *)
        echo "usage: dynsec-sim.sh add|remove" >&2
        exit 2
        ;;
esac
