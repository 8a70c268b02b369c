-- Hourly rollup of numeric telemetry, filled by the API service's rollup job (iot_api.rollup) for closed
-- hours, so that long-range aggregates read one row per hour instead of 3,600 raw rows. There is no
-- trigger on telemetry: ingest pays nothing for it.
CREATE TABLE telemetry_hourly (
    device_id   text NOT NULL,
    metric      text NOT NULL,
    bucket      timestamptz NOT NULL,
    count       bigint NOT NULL,
    sum         double precision NOT NULL,
    min         double precision NOT NULL,
    max         double precision NOT NULL,
    PRIMARY KEY (device_id, metric, bucket)
);
CREATE INDEX telemetry_hourly_bucket_idx ON telemetry_hourly (bucket);

-- Watermark of the rollup: every hour before rolled_until is in telemetry_hourly. One row at most.
CREATE TABLE telemetry_rollup_state (
    id            boolean PRIMARY KEY DEFAULT true CHECK (id),
    rolled_until  timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
