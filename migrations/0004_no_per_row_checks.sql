-- Integrity that the engine guarantees by construction, checked per row at a cost every
-- step paid: the status CHECK is re-parsed on every UPDATE of a run, and each run insert
-- ran two foreign-key probes. A run and its message are inserted by one statement, a
-- child's parent is the run that statement's transaction holds locked, and nothing
-- deletes runs or messages; `status` is only ever written from the engine's own constants.
ALTER TABLE run DROP CONSTRAINT run_status_check;
ALTER TABLE run DROP CONSTRAINT run_message_id_fkey;
ALTER TABLE run DROP CONSTRAINT run_parent_id_fkey;
