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
SELECT seq, type, saga, step, phase, step_index, instance, iteration,
       handler_iteration, run_id, message_id, root_id, lineage, worker,
       failure::text AS failure, context::text AS context, created_at
  FROM {q}.event WHERE root_id = $1 ORDER BY seq

-- name: runs_of
SELECT id, saga, parent_id, status, lineage, message_id, created_at, updated_at,
       failure::text AS failure, rollback_failure::text AS rollback_failure,
       state::text AS state
  FROM {q}.run WHERE root_id = $1 ORDER BY created_at, id
