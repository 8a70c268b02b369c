-- Commands that wait for offline devices (docs/api.md, "Commands"): a command for a device whose status is
-- 'offline' is stored 'queued' and published by ingest when the device comes online, in creation order,
-- or becomes 'expired' at its deadline (expires_at, set for every command the API creates).
ALTER TABLE commands DROP CONSTRAINT commands_state_check;
ALTER TABLE commands ADD CONSTRAINT commands_state_check
    CHECK (state IN ('queued', 'pending', 'sent', 'acked', 'failed', 'expired'));

-- What the flush of a device reads: its queued commands, oldest first.
CREATE INDEX commands_queued_idx ON commands (device_id, created_at, id) WHERE state = 'queued';

-- The periodic expiry now also takes queued commands past their deadline.
DROP INDEX commands_waiting_expiry_idx;
CREATE INDEX commands_waiting_expiry_idx ON commands (expires_at) WHERE state IN ('queued', 'pending', 'sent');

-- What every batch with readings asks (a reading from a device marked offline sets it online): the few
-- offline devices among the batch's, without visiting every device row.
CREATE INDEX devices_offline_idx ON devices (id) WHERE status = 'offline';
