-- MQTT credentials of devices (issue 10). The MQTT username is the device id; only a SHA-256 of the
-- generated secret is kept (192 random bits, so a fast hash is safe, as for API keys). A revoked
-- credential keeps its row (revoked_at set) until it is rotated again or the device is deleted.
CREATE TABLE device_credentials (
    device_id    text PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
    secret_hash  text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    rotated_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);
