-- What operators do to running and finished hierarchies: cancel and undo.

-- name: find_root
-- The root and lineage of a run id, or of a root message id.
SELECT root_id, lineage FROM {q}.run WHERE id = $1
UNION ALL
SELECT id, ARRAY[id] FROM {q}.message WHERE id = $1 AND parent_run_id IS NULL
LIMIT 1

-- name: cancel
WITH c AS (
    INSERT INTO {q}.cancellation (target, root_id, failure)
    VALUES ($1, $2, $3::jsonb)
    ON CONFLICT (target) DO NOTHING
    RETURNING target
), ev AS (
    INSERT INTO {q}.event (root_id, message_id, run_id, type, lineage, failure, worker)
    SELECT $2, $2, CASE WHEN $1 = $2 THEN NULL ELSE $1 END, 'CANCELLATION_REQUESTED',
           $4::uuid[], $3::jsonb, $5
      FROM c
    RETURNING 1
)
SELECT (SELECT count(*) FROM c) AS inserted, (SELECT count(*) FROM ev) AS events

-- Wake the runs of a cancelled sub-tree that wait (for time or for children) so they give up
-- now. Nothing about ready_at may be in the WHERE clause: it would be judged on the row
-- version before a committing step's update, and the row skipped. The SET is computed on the
-- locked, current version instead. The first form waits for locked runs (under a lock
-- timeout); the second, its fallback, skips them: they see the request when they finish.

-- name: _released
-- A held run an operator cancels or undoes is released to any worker, which rolls it back
-- translating its steps by name (engine/definition.py).
prefix = CASE WHEN r.held IS NOT NULL THEN NULL ELSE r.prefix END, held = NULL

-- name: _wake_cancelled
WITH w AS (
    UPDATE {q}.run r
       SET ready_at = CASE WHEN r.ready_at IS NULL OR r.ready_at > clock_timestamp()
                           THEN clock_timestamp() ELSE r.ready_at END,
           {_released}
     WHERE r.id IN (SELECT id FROM {q}.run
                     WHERE root_id = $2 AND $1 = ANY (lineage)
                       AND status IN ('pending', 'active') {lock})
       AND r.status IN ('pending', 'active')
    RETURNING r.saga
), nt AS (
    SELECT pg_notify($3, 'r:' || saga) FROM (SELECT DISTINCT saga FROM w) d WHERE $4
)
SELECT (SELECT count(*) FROM w) AS woken, (SELECT count(*) FROM nt) AS notified

-- name: wake_cancelled
-- set lock:
{_wake_cancelled}

-- name: wake_cancelled_unlocked
-- set lock: FOR UPDATE SKIP LOCKED
{_wake_cancelled}

-- name: lock_timeout
SET LOCAL lock_timeout = '250ms'

-- name: undo_candidates
-- The runs an undo of $2 addresses: the root runs of a root message, or one run.
SELECT id, saga, status, parent_id, lineage, message_id
  FROM {q}.run
 WHERE root_id = $1 AND ($2::uuid = root_id AND parent_id IS NULL OR id = $2)
   FOR UPDATE

-- name: unfinished_in_root
SELECT count(*) FROM {q}.run
 WHERE root_id = $1 AND status IN ('pending', 'active')

-- name: undo
-- Its runs roll back under whatever definition the workers run now, steps found by name.
WITH u AS (
    UPDATE {q}.run
       SET status = 'active', rollback_request = $2::jsonb, prefix = NULL,
           ready_at = clock_timestamp(), updated_at = clock_timestamp()
     WHERE id = ANY ($1::uuid[]) AND status = 'committed'
    RETURNING id, saga, root_id, message_id, lineage
), ev AS (
    INSERT INTO {q}.event (root_id, message_id, type, lineage, failure, worker)
    SELECT DISTINCT ON (message_id) root_id, message_id, 'ROLLBACK_EMITTED',
           lineage[1:cardinality(lineage) - 1], $3::jsonb, $4
      FROM u
    RETURNING 1
), nt AS (
    SELECT pg_notify($5, 'r:' || saga) FROM (SELECT DISTINCT saga FROM u) d WHERE $6
)
SELECT (SELECT count(*) FROM u) AS updated, (SELECT count(*) FROM ev) AS events,
       (SELECT count(*) FROM nt) AS notified

-- name: move
-- An operator lets a held run go on under the definition the workers run now: its steps
-- found by name, and, with $2, going on with the step called $2.
WITH m AS (
    UPDATE {q}.run r
       SET held = NULL, prefix = NULL, ready_at = clock_timestamp(),
           state = CASE WHEN $2::text IS NULL THEN r.state
                        ELSE jsonb_set(r.state, ARRAY['goto'], to_jsonb($2::text)) END,
           updated_at = clock_timestamp()
     WHERE r.id = $1 AND r.held IS NOT NULL
    RETURNING r.id, r.root_id, r.message_id, r.saga, r.lineage
), ev AS (
    INSERT INTO {q}.event (root_id, message_id, run_id, type, saga, lineage, worker, step)
    SELECT root_id, message_id, id, 'RELEASED', saga, lineage, $3, $2 FROM m
    RETURNING 1
), nt AS (
    SELECT pg_notify($4, 'r:' || saga) FROM m WHERE $5
)
SELECT (SELECT saga FROM m) AS saga, (SELECT count(*) FROM ev) AS events,
       (SELECT count(*) FROM nt) AS notified
