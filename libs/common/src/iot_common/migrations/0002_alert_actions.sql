-- Alerts, automations and device commands (issue 6): the outcome of every action a rule runs, and the
-- indexes the ingest service's periodic work needs.

-- One row per action run (a webhook POST or a command sent to a device) started by an alert opening or
-- resolving. Written by the ingest service: 'running' when a worker takes it, then 'succeeded' or 'failed'
-- with the number of attempts and the last error.
CREATE TABLE action_runs (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    alert_id     uuid NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
    rule_id      uuid NOT NULL REFERENCES alert_rules (id) ON DELETE CASCADE,
    trigger      text NOT NULL CHECK (trigger IN ('open', 'resolve')),
    kind         text NOT NULL CHECK (kind IN ('webhook', 'command')),
    target       text NOT NULL,
    state        text NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'succeeded', 'failed')),
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text,
    command_id   uuid REFERENCES commands (id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX action_runs_alert_idx ON action_runs (alert_id, created_at);
CREATE INDEX action_runs_created_idx ON action_runs (created_at DESC, id);

-- The periodic expiry scans only commands still waiting for an answer.
CREATE INDEX commands_waiting_expiry_idx ON commands (expires_at) WHERE state IN ('pending', 'sent');
