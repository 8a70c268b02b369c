-- Initial schema of the IoT platform.

CREATE TABLE devices (
    id          text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'),
    name        text NOT NULL DEFAULT '',
    type        text NOT NULL DEFAULT 'generic',
    status      text NOT NULL DEFAULT 'unknown' CHECK (status IN ('unknown', 'online', 'offline')),
    attributes  jsonb NOT NULL DEFAULT '{}'::jsonb,
    last_seen   timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_type_idx ON devices (type, id);
CREATE INDEX devices_status_idx ON devices (status, id);

-- One row per (device, metric, instant): the primary key makes a redelivered reading a no-op
-- (INSERT ... ON CONFLICT DO NOTHING). Daily range partitions, managed by iot_common.db.partitions.
-- No foreign key to devices: deleting a device must not scan every partition.
CREATE TABLE telemetry (
    device_id   text NOT NULL,
    metric      text NOT NULL,
    ts          timestamptz NOT NULL,
    value       double precision,
    value_text  text,
    PRIMARY KEY (device_id, metric, ts),
    CHECK ((value IS NULL) <> (value_text IS NULL))
) PARTITION BY RANGE (ts);

-- Dead letters: every MQTT message the ingest service refused, with the reason.
CREATE TABLE ingest_rejects (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at  timestamptz NOT NULL DEFAULT now(),
    topic        text NOT NULL,
    device_id    text,
    reason       text NOT NULL,
    detail       text NOT NULL DEFAULT '',
    payload      text NOT NULL DEFAULT '',
    payload_size integer NOT NULL DEFAULT 0
);
CREATE INDEX ingest_rejects_received_idx ON ingest_rejects (received_at DESC, id DESC);
CREATE INDEX ingest_rejects_device_idx ON ingest_rejects (device_id, received_at DESC);
CREATE INDEX ingest_rejects_reason_idx ON ingest_rejects (reason, received_at DESC);

CREATE TABLE users (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email         text NOT NULL,
    password_hash text NOT NULL,
    role          text NOT NULL DEFAULT 'user' CHECK (role IN ('admin', 'user', 'viewer')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    disabled_at   timestamptz
);
CREATE UNIQUE INDEX users_email_idx ON users (lower(email));

CREATE TABLE api_keys (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name         text NOT NULL,
    prefix       text NOT NULL UNIQUE,
    key_hash     text NOT NULL,
    scopes       text[] NOT NULL CHECK (scopes <@ ARRAY['read', 'write', 'admin']::text[]),
    created_by   uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);

CREATE TABLE alert_rules (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name         text NOT NULL,
    device_id    text REFERENCES devices (id) ON DELETE CASCADE,
    device_type  text,
    metric       text NOT NULL,
    op           text NOT NULL CHECK (op IN ('>', '>=', '<', '<=', '==', '!=')),
    threshold    double precision NOT NULL,
    for_seconds  integer NOT NULL DEFAULT 0 CHECK (for_seconds >= 0),
    hysteresis   double precision NOT NULL DEFAULT 0 CHECK (hysteresis >= 0),
    severity     text NOT NULL DEFAULT 'warning' CHECK (severity IN ('info', 'warning', 'critical')),
    message      text NOT NULL DEFAULT '',
    action       jsonb,
    enabled      boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CHECK ((device_id IS NULL) <> (device_type IS NULL))
);

CREATE TABLE alerts (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    rule_id      uuid NOT NULL REFERENCES alert_rules (id) ON DELETE CASCADE,
    device_id    text NOT NULL,
    metric       text NOT NULL,
    severity     text NOT NULL,
    message      text NOT NULL DEFAULT '',
    value        double precision,
    threshold    double precision NOT NULL,
    state        text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'resolved')),
    opened_at    timestamptz NOT NULL DEFAULT now(),
    resolved_at  timestamptz,
    acked_at     timestamptz,
    acked_by     text
);
-- At most one open alert per rule and device, whatever the number of ingest replicas.
CREATE UNIQUE INDEX alerts_one_open_idx ON alerts (rule_id, device_id) WHERE state = 'open';
CREATE INDEX alerts_device_idx ON alerts (device_id, opened_at DESC);
CREATE INDEX alerts_opened_idx ON alerts (opened_at DESC, id);

CREATE TABLE commands (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    device_id   text NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    name        text NOT NULL,
    params      jsonb NOT NULL DEFAULT '{}'::jsonb,
    state       text NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'sent', 'acked', 'failed', 'expired')),
    result      jsonb,
    error       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz
);
CREATE INDEX commands_device_idx ON commands (device_id, created_at DESC);
