-- The handler registry, paused sagas, and the worker's poll.

-- name: subscribe
INSERT INTO {q}.subscription (topic, saga)
SELECT * FROM unnest($1::text[], $2::text[])
ON CONFLICT DO NOTHING

-- name: lock_registry
-- Waits out every step emitting right now (see _registry_lock).
SELECT pg_advisory_xact_lock({_registry_lock})

-- name: unsubscribe
-- Remove a subscription, skip that saga's runs on the topic that have not started, and let
-- the parents that waited only for those go on.
WITH d AS (
    DELETE FROM {q}.subscription WHERE topic = $1 AND saga = $2 RETURNING 1
), s AS (
    SELECT r.id, r.parent_id, r.awaited
      FROM {q}.run r JOIN {q}.message m ON m.id = r.message_id
     WHERE r.saga = $2 AND r.ready_at IS NOT NULL AND r.status = 'pending'
       AND m.topic = $1
       FOR UPDATE OF r SKIP LOCKED
), u AS (
    UPDATE {q}.run r
       SET status = 'skipped', awaited = false, ready_at = NULL,
           updated_at = clock_timestamp()
      FROM s WHERE r.id = s.id
    RETURNING s.parent_id, s.awaited, r.root_id, r.parent_id IS NULL AS root
), c AS (
    SELECT parent_id, count(*) AS n FROM u
     WHERE awaited AND parent_id IS NOT NULL GROUP BY parent_id
), p AS (
    UPDATE {q}.run p
       SET pending = p.pending - c.n,
           ready_at = CASE WHEN p.pending = c.n THEN {_parent_ready}
                           ELSE p.ready_at END,
           updated_at = clock_timestamp()
      FROM c WHERE p.id = c.parent_id
    RETURNING p.saga, p.pending
), nt AS (
    SELECT pg_notify($3, n)
      FROM (SELECT DISTINCT 'r:' || saga AS n FROM p WHERE pending = 0
            UNION SELECT DISTINCT 'd:' || root_id FROM u WHERE root) q
     WHERE $4
)
SELECT (SELECT count(*) FROM d) AS deleted, (SELECT count(*) FROM u) AS skipped,
       (SELECT count(*) FROM nt) AS notified,
       ARRAY(SELECT saga FROM p WHERE pending = 0) AS ready

-- name: subscriptions
SELECT topic, saga FROM {q}.subscription ORDER BY topic, saga

-- name: pause
INSERT INTO {q}.paused_saga (saga, reason) VALUES ($1, $2)
ON CONFLICT (saga) DO UPDATE SET reason = EXCLUDED.reason

-- name: resume
WITH d AS (DELETE FROM {q}.paused_saga WHERE saga = $1 RETURNING saga)
SELECT pg_notify($2, 'r:' || saga) FROM d WHERE $3

-- name: paused
SELECT saga FROM {q}.paused_saga ORDER BY saga

-- name: poll
-- The earliest ready_at of each saga served: due now, or when to look again.
SELECT s.saga,
       (SELECT r.ready_at FROM {q}.run r
         WHERE r.saga = s.saga AND r.ready_at IS NOT NULL
         ORDER BY r.ready_at LIMIT 1) AS ready_at,
       clock_timestamp() AS now
  FROM unnest($1::text[]) AS s(saga)
