-- Tenants, users and roles: every row a credential can reach belongs to one tenant (docs/tenancy.md).
-- Every existing row moves into the tenant `default`, whose id is fixed
-- (iot_common.tenancy.DEFAULT_TENANT_ID) so that code and documentation can name it.
--
-- Who fills tenant_id:
-- - devices: the writer; a device registered without one (ingest's IOT_INGEST_AUTO_REGISTER) joins
--   `default` (the column's default).
-- - users, api_keys, alert_rules: the writer, always (no default: a forgotten tenant is an error, never a
--   row in the wrong tenant). A rule on one device must be in that device's tenant (foreign key).
-- - commands, alerts, action_runs, ingest_rejects: the database, from the row they belong to (the device,
--   the rule) when the writer leaves it NULL; a value the writer gives must agree (foreign keys).
--   A dead letter whose device is unknown has no tenant (NULL): only platform admins see those.
-- Device ids stay globally unique (the MQTT topic names them); telemetry rows and the hourly rollup carry
-- no tenant: they are reached through their device.

CREATE TABLE tenants (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name                text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    -- Limits; NULL is no limit. max_devices: devices the tenant may own (API creation and import);
    -- max_readings_per_s: readings per second ingest accepts from the tenant's devices together.
    max_devices         integer CHECK (max_devices >= 0),
    max_readings_per_s  integer CHECK (max_readings_per_s >= 0),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX tenants_name_idx ON tenants (lower(name));

INSERT INTO tenants (id, name) VALUES ('00000000-0000-0000-0000-000000000001', 'default');

-- Devices: a constant default backfills every existing row without rewriting the table.
ALTER TABLE devices
    ADD COLUMN tenant_id uuid NOT NULL DEFAULT '00000000-0000-0000-0000-000000000001'
        REFERENCES tenants (id) ON DELETE RESTRICT;
-- (tenant_id, id): the tenant's device list in id order, and the key that dependent rows point at.
ALTER TABLE devices ADD CONSTRAINT devices_tenant_id_key UNIQUE (tenant_id, id);
DROP INDEX devices_type_idx;
DROP INDEX devices_status_idx;
CREATE INDEX devices_tenant_type_idx ON devices (tenant_id, type, id);
CREATE INDEX devices_tenant_status_idx ON devices (tenant_id, status, id);

-- Users: one tenant each, a role in it; platform admins (tenant management, any tenant) live in `default`.
-- Former roles: admin stays admin (and becomes platform admin: it could do everything before), viewer
-- stays viewer, user (read and write) becomes operator (read, commands, alert acknowledgements).
ALTER TABLE users
    ADD COLUMN tenant_id uuid REFERENCES tenants (id) ON DELETE CASCADE,
    ADD COLUMN platform_admin boolean NOT NULL DEFAULT false;
ALTER TABLE users DROP CONSTRAINT users_role_check;
UPDATE users SET tenant_id = '00000000-0000-0000-0000-000000000001',
                 platform_admin = (role = 'admin'),
                 role = CASE role WHEN 'user' THEN 'operator' ELSE role END;
ALTER TABLE users
    ALTER COLUMN tenant_id SET NOT NULL,
    ALTER COLUMN role DROP DEFAULT,
    ADD CONSTRAINT users_role_check CHECK (role IN ('viewer', 'operator', 'admin')),
    ADD CONSTRAINT users_platform_admin_check
        CHECK (NOT platform_admin OR (role = 'admin' AND tenant_id = '00000000-0000-0000-0000-000000000001'));
CREATE INDEX users_tenant_idx ON users (tenant_id, created_at, id);

-- API keys: one tenant each. platform_admin marks the key IOT_BOOTSTRAP_API_KEY names (the API sets it at
-- start-up); no key created through the API has it.
ALTER TABLE api_keys
    ADD COLUMN tenant_id uuid REFERENCES tenants (id) ON DELETE CASCADE,
    ADD COLUMN platform_admin boolean NOT NULL DEFAULT false;
UPDATE api_keys SET tenant_id = '00000000-0000-0000-0000-000000000001';
ALTER TABLE api_keys
    ALTER COLUMN tenant_id SET NOT NULL,
    ADD CONSTRAINT api_keys_platform_admin_check
        CHECK (NOT platform_admin OR tenant_id = '00000000-0000-0000-0000-000000000001');
CREATE INDEX api_keys_tenant_idx ON api_keys (tenant_id, created_at, id);
CREATE INDEX api_keys_created_by_idx ON api_keys (created_by);

-- Fills tenant_id from the device a row names, when the writer left it NULL.
CREATE FUNCTION tenant_of_device() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.tenant_id := (SELECT tenant_id FROM devices WHERE id = NEW.device_id);
    RETURN NEW;
END
$$;

-- Fills tenant_id from the alert rule a row names, when the writer left it NULL.
CREATE FUNCTION tenant_of_rule() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.tenant_id := (SELECT tenant_id FROM alert_rules WHERE id = NEW.rule_id);
    RETURN NEW;
END
$$;

-- Alert rules: the writer names the tenant; a rule on one device is in that device's tenant.
ALTER TABLE alert_rules ADD COLUMN tenant_id uuid REFERENCES tenants (id) ON DELETE CASCADE;
UPDATE alert_rules SET tenant_id = '00000000-0000-0000-0000-000000000001';
ALTER TABLE alert_rules
    ALTER COLUMN tenant_id SET NOT NULL,
    ADD CONSTRAINT alert_rules_tenant_id_key UNIQUE (tenant_id, id),
    ADD CONSTRAINT alert_rules_tenant_device_fkey FOREIGN KEY (tenant_id, device_id)
        REFERENCES devices (tenant_id, id) ON DELETE CASCADE;
CREATE TRIGGER alert_rules_tenant BEFORE INSERT ON alert_rules
    FOR EACH ROW WHEN (NEW.tenant_id IS NULL AND NEW.device_id IS NOT NULL) EXECUTE FUNCTION tenant_of_device();
CREATE INDEX alert_rules_tenant_idx ON alert_rules (tenant_id, created_at DESC, id DESC);

-- Alerts: the tenant of their rule.
ALTER TABLE alerts ADD COLUMN tenant_id uuid REFERENCES tenants (id) ON DELETE CASCADE;
UPDATE alerts SET tenant_id = '00000000-0000-0000-0000-000000000001';
ALTER TABLE alerts
    ALTER COLUMN tenant_id SET NOT NULL,
    ADD CONSTRAINT alerts_tenant_rule_fkey FOREIGN KEY (tenant_id, rule_id)
        REFERENCES alert_rules (tenant_id, id) ON DELETE CASCADE;
CREATE TRIGGER alerts_tenant BEFORE INSERT ON alerts
    FOR EACH ROW WHEN (NEW.tenant_id IS NULL) EXECUTE FUNCTION tenant_of_rule();
DROP INDEX alerts_opened_idx;
CREATE INDEX alerts_tenant_opened_idx ON alerts (tenant_id, opened_at DESC, id DESC);

-- Action runs: the tenant of their rule.
ALTER TABLE action_runs ADD COLUMN tenant_id uuid REFERENCES tenants (id) ON DELETE CASCADE;
UPDATE action_runs SET tenant_id = '00000000-0000-0000-0000-000000000001';
ALTER TABLE action_runs
    ALTER COLUMN tenant_id SET NOT NULL,
    ADD CONSTRAINT action_runs_tenant_rule_fkey FOREIGN KEY (tenant_id, rule_id)
        REFERENCES alert_rules (tenant_id, id) ON DELETE CASCADE;
CREATE TRIGGER action_runs_tenant BEFORE INSERT ON action_runs
    FOR EACH ROW WHEN (NEW.tenant_id IS NULL) EXECUTE FUNCTION tenant_of_rule();

-- Commands: the tenant of their device.
ALTER TABLE commands ADD COLUMN tenant_id uuid REFERENCES tenants (id) ON DELETE CASCADE;
UPDATE commands SET tenant_id = '00000000-0000-0000-0000-000000000001';
ALTER TABLE commands
    ALTER COLUMN tenant_id SET NOT NULL,
    ADD CONSTRAINT commands_tenant_device_fkey FOREIGN KEY (tenant_id, device_id)
        REFERENCES devices (tenant_id, id) ON DELETE CASCADE;
CREATE TRIGGER commands_tenant BEFORE INSERT ON commands
    FOR EACH ROW WHEN (NEW.tenant_id IS NULL) EXECUTE FUNCTION tenant_of_device();

-- Dead letters: the tenant of their device when it is known, else NULL (platform admins only).
-- No foreign key to devices: a dead letter outlives its device, as before.
ALTER TABLE ingest_rejects ADD COLUMN tenant_id uuid REFERENCES tenants (id) ON DELETE CASCADE;
UPDATE ingest_rejects r SET tenant_id = d.tenant_id FROM devices d WHERE d.id = r.device_id;
CREATE TRIGGER ingest_rejects_tenant BEFORE INSERT ON ingest_rejects
    FOR EACH ROW WHEN (NEW.tenant_id IS NULL AND NEW.device_id IS NOT NULL) EXECUTE FUNCTION tenant_of_device();
CREATE INDEX ingest_rejects_tenant_idx ON ingest_rejects (tenant_id, received_at DESC, id DESC);
DROP INDEX ingest_rejects_reason_idx;
CREATE INDEX ingest_rejects_tenant_reason_idx ON ingest_rejects (tenant_id, reason, received_at DESC);

-- Audit: every state-changing API request, written by the API after the response (one per request).
-- tenant_id is the tenant the request acted in; no foreign key, so that a deleted tenant's record stays
-- until IOT_AUDIT_RETENTION_DAYS removes it.
CREATE TABLE audit_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   uuid NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,                      -- 'user:<uuid>' or 'key:<uuid>'
    actor_kind  text NOT NULL CHECK (actor_kind IN ('user', 'api_key')),
    action      text NOT NULL,                      -- the operation id, e.g. createDevice
    method      text NOT NULL,
    path        text NOT NULL,
    target      text,                               -- the resource the request named, if any
    request_id  text NOT NULL,
    status      smallint NOT NULL                   -- the HTTP status answered
);
CREATE INDEX audit_events_tenant_idx ON audit_events (tenant_id, at DESC, id DESC);
CREATE INDEX audit_events_at_idx ON audit_events (at);
