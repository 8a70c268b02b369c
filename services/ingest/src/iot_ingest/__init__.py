"""Ingest service: devices' MQTT telemetry into PostgreSQL, the Redis cache and Redis pub/sub."""
