-- Device state (docs/device-state.md): what operators want a device to have (desired), what the device
-- says it has (reported), and a version that increases by one on every change of either side. One row per
-- device that ever had a state (created by the first change); a device without a row is at version 0.
CREATE TABLE device_state (
    tenant_id    uuid NOT NULL,
    device_id    text NOT NULL,
    desired      jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(desired) = 'object'),
    reported     jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(reported) = 'object'),
    version      bigint NOT NULL DEFAULT 0 CHECK (version >= 0),
    desired_at   timestamptz,
    reported_at  timestamptz,
    PRIMARY KEY (device_id),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, id) ON DELETE CASCADE
);

-- Every change: the version it made, the side, the merge patch as sent, who sent it (the API's
-- principal, `user:<id>` or `key:<id>`, or `device` for a report) and, for a report, the desired version
-- the device said it applied.
CREATE TABLE device_state_history (
    tenant_id        uuid NOT NULL,
    device_id        text NOT NULL,
    version          bigint NOT NULL,
    side             text NOT NULL CHECK (side IN ('desired', 'reported')),
    patch            jsonb NOT NULL,
    actor            text NOT NULL,
    applied_version  bigint,
    at               timestamptz NOT NULL,
    PRIMARY KEY (device_id, version),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, id) ON DELETE CASCADE
);
