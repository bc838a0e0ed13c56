-- Flow control (issue 15): priorities, and the state of cluster-wide rate limits.
-- Concurrency limits need no table: each step transaction of a limited saga holds one of
-- its N advisory slot locks until it ends (engine/sql/limits.sql).

-- A launch's priority, copied to the runs it starts; higher is claimed sooner by sagas that
-- declare priorities. Only runs with a priority are in the index, so others pay nothing.
ALTER TABLE message ADD COLUMN priority integer NOT NULL DEFAULT 0;
ALTER TABLE run ADD COLUMN priority integer NOT NULL DEFAULT 0;
CREATE INDEX run_priority_idx ON run (saga, priority DESC, ready_at)
    WHERE ready_at IS NOT NULL AND priority > 0;

-- Rate limits as a generic cell rate algorithm: `tat` is the theoretical arrival time of
-- the next start; a start is allowed once it has come, and moves it one interval on.
CREATE TABLE rate_limit (
    saga text PRIMARY KEY,
    tat  timestamptz NOT NULL
);
