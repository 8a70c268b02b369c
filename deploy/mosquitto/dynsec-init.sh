#!/bin/sh
# Create Mosquitto's dynamic-security file once: the admin user (the API provisions devices through it)
# and the platform's service users with their roles. An existing file is left alone, so passwords and
# devices provisioned since are kept. Run by the `mosquitto-init` one-shot service of deploy/compose.yml;
# usable anywhere Mosquitto 2 and mosquitto_ctrl are installed (see docs/device-identity.md).
#
# Environment: MQTT_ADMIN_PASSWORD, MQTT_INGEST_PASSWORD, MQTT_API_PASSWORD (required),
# MQTT_SIM_PASSWORD (optional: no simulator user without it), DYNSEC_FILE, DYNSEC_PLUGIN, DYNSEC_INIT_PORT.
set -eu

FILE=${DYNSEC_FILE:-/mosquitto/data/dynamic-security.json}
PLUGIN=${DYNSEC_PLUGIN:-/usr/lib/mosquitto_dynamic_security.so}
PORT=${DYNSEC_INIT_PORT:-18830}
: "${MQTT_ADMIN_PASSWORD:?set MQTT_ADMIN_PASSWORD}"
: "${MQTT_INGEST_PASSWORD:?set MQTT_INGEST_PASSWORD}"
: "${MQTT_API_PASSWORD:?set MQTT_API_PASSWORD}"

if [ -s "$FILE" ]; then
    echo "dynsec-init: $FILE exists, nothing to do"
    exit 0
fi

DIR=$(dirname "$FILE")
WORK=$(mktemp -d "$DIR/.dynsec-init.XXXXXX")
chmod 755 "$WORK"
trap 'rm -rf "$WORK"' EXIT
mosquitto_ctrl dynsec init "$WORK/dynsec.json" admin "$MQTT_ADMIN_PASSWORD" >/dev/null
if [ "$(id -u)" = 0 ]; then
    # Mosquitto started as root runs as `mosquitto`, which must read and save the file.
    chown mosquitto:mosquitto "$WORK" "$WORK/dynsec.json"
fi

# A temporary broker on the loopback interface, only to apply the commands below.
cat >"$WORK/init.conf" <<CONF
listener $PORT 127.0.0.1
allow_anonymous false
persistence false
plugin $PLUGIN
plugin_opt_config_file $WORK/dynsec.json
CONF
mosquitto -c "$WORK/init.conf" >"$WORK/broker.log" 2>&1 &
BROKER=$!

# mosquitto_ctrl warns on stderr about the unencrypted loopback connection: show its output on failure only.
ctl() {
    if ! out=$(mosquitto_ctrl -h 127.0.0.1 -p "$PORT" -u admin -P "$MQTT_ADMIN_PASSWORD" dynsec "$@" 2>&1); then
        echo "dynsec-init: mosquitto_ctrl dynsec $1 failed: $out" >&2
        return 1
    fi
}

tries=0
until ctl getDefaultACLAccess 2>/dev/null; do
    tries=$((tries + 1))
    if [ "$tries" -gt 100 ] || ! kill -0 "$BROKER" 2>/dev/null; then
        echo "dynsec-init: the temporary broker did not start:" >&2
        cat "$WORK/broker.log" >&2
        exit 1
    fi
    sleep 0.1
done

# service_user NAME PASSWORD ACLTYPE TOPIC [ACLTYPE TOPIC ...]: user NAME with role service-NAME.
service_user() {
    name=$1 password=$2
    shift 2
    ctl createRole "service-$name"
    while [ "$#" -ge 2 ]; do
        ctl addRoleACL "service-$name" "$1" "$2" allow
        shift 2
    done
    ctl createClient "$name" -p "$password"
    ctl addClientRole "$name" "service-$name"
}

# Ingest reads every device's telemetry, status, command answers and state reports through its shared
# subscription, sends the commands of alert-rule actions and re-publishes desired states (retained).
service_user ingest "$MQTT_INGEST_PASSWORD" \
    subscribePattern '$share/+/devices/telemetry/+' \
    subscribePattern '$share/+/devices/status/+' \
    subscribePattern '$share/+/devices/commands/+/ack' \
    subscribePattern 'devices/telemetry/+' \
    subscribePattern 'devices/status/+' \
    subscribePattern 'devices/commands/+/ack' \
    subscribePattern '$share/+/devices/state/+/reported' \
    subscribePattern 'devices/state/+/reported' \
    publishClientReceive 'devices/telemetry/+' \
    publishClientReceive 'devices/status/+' \
    publishClientReceive 'devices/commands/+/ack' \
    publishClientReceive 'devices/state/+/reported' \
    publishClientSend 'devices/commands/+' \
    publishClientSend 'devices/state/+/desired'
# The API sends commands and desired states (retained) to devices and reads command answers.
service_user api "$MQTT_API_PASSWORD" \
    publishClientSend 'devices/commands/+' \
    publishClientSend 'devices/state/+/desired' \
    subscribePattern '$share/+/devices/commands/+/ack' \
    subscribePattern 'devices/commands/+/ack' \
    publishClientReceive 'devices/commands/+/ack'
# The simulator (development only) speaks for every device it simulates.
if [ -n "${MQTT_SIM_PASSWORD:-}" ]; then
    service_user sim "$MQTT_SIM_PASSWORD" \
        publishClientSend 'devices/telemetry/+' \
        publishClientSend 'devices/status/+' \
        publishClientSend 'devices/commands/+/ack' \
        publishClientSend 'devices/state/+/reported' \
        subscribePattern 'devices/commands/+' \
        publishClientReceive 'devices/commands/+' \
        subscribePattern 'devices/state/+/desired' \
        publishClientReceive 'devices/state/+/desired'
fi

kill "$BROKER"
wait "$BROKER" || true
mv "$WORK/dynsec.json" "$FILE"
echo "dynsec-init: wrote $FILE (admin, ingest, api${MQTT_SIM_PASSWORD:+, sim})"
