"""Device simulator: a fleet of devices publishing realistic telemetry over MQTT."""
