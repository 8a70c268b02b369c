-- Actions of one rule and device run in order, across ingest replicas (docs/alerts.md, "Order"): a run is
-- inserted 'queued' in the transaction that opens or resolves its alert, and becomes 'running' (started_at)
-- when it starts. Before it starts, a run waits while a run of the same rule and device with a lower seq
-- is still queued or running.
ALTER TABLE action_runs DROP CONSTRAINT action_runs_state_check;
ALTER TABLE action_runs ADD CONSTRAINT action_runs_state_check
    CHECK (state IN ('queued', 'running', 'succeeded', 'failed'));
ALTER TABLE action_runs ALTER COLUMN state SET DEFAULT 'queued';
ALTER TABLE action_runs ADD COLUMN started_at timestamptz;
ALTER TABLE action_runs ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY;

-- What a run looks up before it starts: the unfinished runs of its rule (few, short-lived).
CREATE INDEX action_runs_unfinished_idx ON action_runs (rule_id, seq) WHERE state IN ('queued', 'running');
