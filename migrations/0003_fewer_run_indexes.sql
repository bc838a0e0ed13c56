-- Every step updates its run's ready_at, which is indexed, so no update is HOT and each
-- index of `run` gets a new entry per step: keep only the ones scheduling needs.
-- UNIQUE (message_id, saga) held by construction (a message's runs are fanned out from
-- distinct subscription rows when it is inserted); root runs are found by root id.
ALTER TABLE run DROP CONSTRAINT run_message_id_saga_key;
DROP INDEX run_root_idx;
CREATE INDEX run_root_idx ON run (root_id, parent_id);
