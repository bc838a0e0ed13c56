-- Claiming a run: lock it, and read everything its step transaction needs in one round trip.

-- name: _registry_lock
-- Every step transaction holds this lock shared from its claim to its commit, and
-- unsubscribing takes it exclusively: the skip of unstarted runs then sees every run that a
-- step emitted from the old registry (none is created after it, unskipped).
hashtext('scoopy.registry:{schema}')

-- name: _run_columns
id, root_id, message_id, saga, parent_id, lineage, status, state,
pending, failed, awaited, context, rollback_request, definition, prefix

-- name: _claimed
-- Lock first, then look: rows skipped because another worker holds them cost no join and no
-- cancellation probe. The locked row's columns come from the CTE, which returns its newest
-- version (re-reading `run` outside it could see an older one). The column names are the
-- fields of `records.Claimed`.
SELECT r.id, r.root_id, r.message_id, r.saga, r.parent_id, r.lineage, r.status,
       r.state::text AS state, r.pending, r.failed, r.awaited,
       r.context::text AS context, r.rollback_request::text AS rollback_request,
       r.definition, r.prefix, m.topic, m.payload::text AS payload,
       (SELECT c.failure::text FROM {q}.cancellation c
         WHERE c.target = ANY (r.lineage)
         ORDER BY c.created_at LIMIT 1) AS cancellation,
       (SELECT clock_timestamp() FROM pg_advisory_xact_lock_shared({_registry_lock})) AS now,
       (SELECT count(*) FROM (SELECT 1 FROM {q}.run x
                               WHERE x.saga = r.saga
                                 AND x.ready_at <= clock_timestamp()
                               LIMIT $2) AS x) AS ready
  FROM r LEFT JOIN {q}.message m ON m.id = r.message_id

-- name: _claimable
-- Due, fit for this worker's definition, its saga not paused.
ready_at <= clock_timestamp()
       AND (prefix IS NULL AND $4 OR prefix = ANY ($3::text[]))
       AND NOT EXISTS (SELECT 1 FROM {q}.paused_saga p WHERE p.saga = $1)

-- name: claim
-- The oldest ready run of saga $1 that this worker's definition of the saga may advance
-- (one whose prefix is among $3: see engine/definition.py; or, with $4, one not started
-- yet), unless the saga is paused; $2 caps the count of ready runs.
WITH r AS (
    SELECT {_run_columns}
      FROM {q}.run
    WHERE saga = $1 AND {_claimable}
     ORDER BY ready_at
     LIMIT 1
       FOR UPDATE SKIP LOCKED
)
{_claimed}

-- name: reclaim
-- One run by id, waiting for whoever holds it.
WITH r AS (
    SELECT {_run_columns}
      FROM {q}.run
    WHERE id = $1 FOR UPDATE
)
{_claimed}

-- name: reclaim_unpaused
-- A parent settled in its last child's transaction, unless its saga is paused.
WITH r AS (
    SELECT {_run_columns}
      FROM {q}.run
    WHERE id = $1
       AND NOT EXISTS (SELECT 1 FROM {q}.paused_saga p WHERE p.saga = run.saga)
       FOR UPDATE
)
{_claimed}

-- name: plan_by_index
-- A connection's first claim builds the generic plan it keeps until the tables are ANALYZEd.
-- Built on a table still small (a fresh deployment), that plan sorted every ready run for
-- each claim; built with these off, it walks run_ready_idx in order, whatever the statistics
-- say. Set and reset inside the claim's own transaction.
SET LOCAL enable_sort = off; SET LOCAL enable_bitmapscan = off; SET LOCAL enable_seqscan = off

-- name: plan_reset
RESET enable_sort; RESET enable_bitmapscan; RESET enable_seqscan

-- name: defer
-- A run that cannot be advanced waits $2 seconds, so the runs queued behind it go on.
UPDATE {q}.run SET ready_at = clock_timestamp() + make_interval(secs => $2)
 WHERE id = $1 AND ready_at IS NOT NULL
