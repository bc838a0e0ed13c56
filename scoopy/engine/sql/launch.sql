-- Launching root messages from outside a step, and the schedules built on them.

-- name: launch
-- A root message, its EMITTED event and one run per subscribed saga, due at $9 or $10
-- seconds from now. With a key ($8) that exists already nothing is inserted and `existing`
-- is that key's message (NULL while the launch holding the key has not committed). Unless
-- $12 allows it, a message no saga subscribes to is not inserted (`handled` is false): it
-- would start no run, ever.
WITH m AS (
    INSERT INTO {q}.message (id, root_id, topic, payload, context, key, priority)
    SELECT $1, $1, $2, $3::jsonb, $4::jsonb, $8, $11
     WHERE $12 OR EXISTS (SELECT 1 FROM {q}.subscription s WHERE s.topic = $2)
    ON CONFLICT (key) WHERE key IS NOT NULL DO NOTHING
    RETURNING id, topic, context
), ev AS (
    INSERT INTO {q}.event (root_id, message_id, type, lineage, worker, context)
    SELECT $1, $1, 'EMITTED', ARRAY[$1::uuid], $5, $4::jsonb FROM m
    RETURNING 1
), due AS (
    SELECT COALESCE($9::timestamptz,
                    clock_timestamp() + make_interval(secs => COALESCE($10::float8, 0)))
           AS at
), x AS (
    SELECT gen_random_uuid() AS id, s.saga, m.context
      FROM m JOIN {q}.subscription s ON s.topic = m.topic
), r AS (
    INSERT INTO {q}.run (id, root_id, message_id, saga, lineage, context, ready_at,
                         priority, state)
    SELECT x.id, $1, $1, x.saga, ARRAY[$1::uuid, x.id], x.context, due.at, $11,
           CASE WHEN due.at > clock_timestamp()
                THEN jsonb_build_object('resume_at', due.at) ELSE '{}' END
      FROM x, due
    RETURNING saga, ready_at
), nt AS (
    SELECT pg_notify($6, 'r:' || saga)
      FROM (SELECT DISTINCT saga FROM r WHERE ready_at <= clock_timestamp()) d
     WHERE $7
)
SELECT (SELECT count(*) FROM m) AS inserted, (SELECT count(*) FROM ev) AS events,
       $12 OR EXISTS (SELECT 1 FROM {q}.subscription s WHERE s.topic = $2) AS handled,
       (SELECT count(*) FROM nt) AS notified,
       ARRAY(SELECT saga FROM r) AS sagas,
       (SELECT id FROM {q}.message WHERE key = $8 AND NOT EXISTS (SELECT 1 FROM m))
           AS existing

-- name: now
SELECT clock_timestamp()

-- name: lock_xact
-- Serializes transactions taking the same named lock, until they end.
SELECT pg_advisory_xact_lock(hashtext($1))

-- name: schedules
-- Payloads of the schedule chain links still waiting or running.
SELECT m.payload::text FROM {q}.run r JOIN {q}.message m ON m.id = r.message_id
 WHERE r.saga = $1 AND r.ready_at IS NOT NULL AND r.status IN ('pending', 'active')
   AND NOT EXISTS (SELECT 1 FROM {q}.cancellation c WHERE c.target = r.root_id)
 ORDER BY r.ready_at

-- name: active_chains
SELECT DISTINCT r.root_id
  FROM {q}.run r JOIN {q}.message m ON m.id = r.message_id
 WHERE r.saga = $1 AND r.ready_at IS NOT NULL AND r.status IN ('pending', 'active')
   AND (m.key = $2 OR starts_with(m.key, $3))
   AND NOT EXISTS (SELECT 1 FROM {q}.cancellation c WHERE c.target = r.root_id)
