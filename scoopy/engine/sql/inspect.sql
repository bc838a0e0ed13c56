-- Reading hierarchies back: outcomes, runs and the event log.

-- name: root_runs
SELECT id, saga, status, failure::text AS failure,
       rollback_failure::text AS rollback_failure
  FROM {q}.run WHERE root_id = $1 AND parent_id IS NULL AND message_id = $1
 ORDER BY saga

-- name: run_by_id
SELECT id, saga, status, failure::text AS failure,
       rollback_failure::text AS rollback_failure
  FROM {q}.run WHERE id = $1

-- name: message_exists
SELECT EXISTS (SELECT 1 FROM {q}.message WHERE id = $1)

-- name: topic_of
SELECT topic FROM {q}.message WHERE id = $1

-- name: events
-- The columns are the fields of results.Event.
SELECT seq, type, saga, step, run_id, message_id, root_id, lineage, worker,
       failure::text AS failure, context::text AS context, created_at AS time, phase,
       instance, iteration, handler_iteration
  FROM {q}.event WHERE root_id = $1 ORDER BY seq

-- name: runs_of
-- The columns are the fields of results.RunInfo.
SELECT id, saga, parent_id, status, lineage, message_id, created_at, updated_at,
       failure::text AS failure, rollback_failure::text AS rollback_failure
  FROM {q}.run WHERE root_id = $1 ORDER BY created_at, id
