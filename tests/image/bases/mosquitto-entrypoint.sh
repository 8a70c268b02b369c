#!/bin/sh
# As the official eclipse-mosquitto image: /mosquitto belongs to `mosquitto` (the broker, started as
# root, switches to that user itself).
set -e
if [ "$(id -u)" = 0 ] && [ -d /mosquitto ]; then
    chown -R mosquitto:mosquitto /mosquitto || true
fi
exec "$@"
