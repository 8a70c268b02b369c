-- Rollups of numeric telemetry at three levels, each kept longer than raw rows (IOT_ROLLUP_RETENTION_DAYS_*),
-- filled by the API service's rollup job (iot_api.rollup): minutes from raw rows, hours from minutes, days
-- from hours. telemetry_hourly (0003) is the hour level and keeps its rows.
CREATE TABLE telemetry_minutely (
    device_id   text NOT NULL,
    metric      text NOT NULL,
    bucket      timestamptz NOT NULL,
    count       bigint NOT NULL,
    sum         double precision NOT NULL,
    min         double precision NOT NULL,
    max         double precision NOT NULL,
    PRIMARY KEY (device_id, metric, bucket)
);
CREATE INDEX telemetry_minutely_bucket_idx ON telemetry_minutely (bucket);

CREATE TABLE telemetry_daily (
    device_id   text NOT NULL,
    metric      text NOT NULL,
    bucket      timestamptz NOT NULL,
    count       bigint NOT NULL,
    sum         double precision NOT NULL,
    min         double precision NOT NULL,
    max         double precision NOT NULL,
    PRIMARY KEY (device_id, metric, bucket)
);
CREATE INDEX telemetry_daily_bucket_idx ON telemetry_daily (bucket);

-- Watermarks per level: every bucket of the level before it is rolled up. rolled_until (0003) stays the
-- hour level's, so that a replica of an older version keeps reading telemetry_hourly correctly.
-- NULL: the level was never rolled; the job starts at the oldest retained day of raw rows.
ALTER TABLE telemetry_rollup_state
    ADD COLUMN minute_until timestamptz,
    ADD COLUMN hour_until timestamptz,
    ADD COLUMN day_until timestamptz;

-- Minutes that received a reading late (older than ingest's late threshold, iot_common.db.rollups): ingest
-- adds them in the batch's transaction, the rollup job recomputes them (and their hour and day) from raw
-- rows, then deletes them. marked_at is touched on every mark, so that a mark the job is taking waits for
-- the transaction that touched it (see iot_api.rollup).
CREATE TABLE telemetry_rollup_dirty (
    device_id   text NOT NULL,
    metric      text NOT NULL,
    bucket      timestamptz NOT NULL,
    marked_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, metric, bucket)
);
