-- Idempotent launches: at most one message per key, inside or outside a saga.
ALTER TABLE message ADD COLUMN key text;
CREATE UNIQUE INDEX message_key_idx ON message (key) WHERE key IS NOT NULL;

-- Sagas whose runs no worker may claim (deployments, incidents). Runs keep waiting.
CREATE TABLE paused_saga (
    saga       text PRIMARY KEY,
    reason     text,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
