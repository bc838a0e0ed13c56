-- Live topology: workers' heartbeats, runs no live worker's definition fits (held), and
-- subscriptions nobody serves any more.

-- name: _live
-- (saga, prefix) pairs the live workers' definitions accept; $2 is the liveness timeout (s).
live AS (
    SELECT s.key AS saga, a.prefix
      FROM {q}.worker w
     CROSS JOIN LATERAL jsonb_each(w.sagas) AS s(key, value)
     CROSS JOIN LATERAL jsonb_array_elements_text(s.value->'accepted') AS a(prefix)
     WHERE w.stopped_at IS NULL
       AND w.heartbeat_at > clock_timestamp() - make_interval(secs => $2)
)

-- name: heartbeat
-- This worker is alive and serves $5 (saga -> definition and accepted prefixes); the
-- subscriptions of those sagas are served as of now.
WITH w AS (
    INSERT INTO {q}.worker AS w (id, host, pid, sagas)
    VALUES ($1, $2, $3, $5::jsonb)
    ON CONFLICT (id) DO UPDATE
       SET heartbeat_at = clock_timestamp(), sagas = EXCLUDED.sagas, stopped_at = NULL
    RETURNING 1
), s AS (
    UPDATE {q}.subscription SET served_at = clock_timestamp() WHERE saga = ANY ($4::text[])
    RETURNING 1
)
SELECT (SELECT count(*) FROM w) AS workers, (SELECT count(*) FROM s) AS subscriptions

-- name: newest_versions
-- The highest version of each of sagas $1 that a live worker serves ($2: liveness timeout).
SELECT s.key AS saga, max((s.value->>'version')::int) AS version
  FROM {q}.worker w
 CROSS JOIN LATERAL jsonb_each(w.sagas) AS s(key, value)
 WHERE w.stopped_at IS NULL
   AND w.heartbeat_at > clock_timestamp() - make_interval(secs => $2)
   AND s.key = ANY ($1::text[])
 GROUP BY s.key

-- name: worker_stopped
UPDATE {q}.worker SET stopped_at = clock_timestamp(), heartbeat_at = clock_timestamp()
 WHERE id = $1

-- name: forget_workers
-- Workers stopped or silent for longer than $1 seconds are history.
DELETE FROM {q}.worker
 WHERE heartbeat_at < clock_timestamp() - make_interval(secs => $1)

-- name: unfit
-- Ready runs of sagas $1 that have waited longer than $3 seconds for a worker whose
-- definition fits their position, when no live worker's does. Locked, so that a run being
-- claimed right now is left alone.
WITH {_live}
SELECT r.id, r.saga, r.definition, r.prefix, r.state::text AS state
  FROM {q}.run r
 WHERE r.saga = ANY ($1::text[])
   AND r.ready_at <= clock_timestamp() - make_interval(secs => $3)
   AND r.prefix IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM live WHERE live.saga = r.saga AND live.prefix = r.prefix)
 ORDER BY r.ready_at
 LIMIT 200
   FOR UPDATE OF r SKIP LOCKED

-- name: hold
-- Take runs out of the ready index with the reason no worker can advance them, and say so
-- in their event logs.
WITH g AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[]) AS g(id, reason, failure)
), h AS (
    UPDATE {q}.run r
       SET held = g.reason, ready_at = NULL, updated_at = clock_timestamp()
      FROM g WHERE r.id = g.id
    RETURNING r.id, r.root_id, r.message_id, r.saga, r.lineage, g.failure
), ev AS (
    INSERT INTO {q}.event (root_id, message_id, run_id, type, saga, lineage, failure, worker)
    SELECT root_id, message_id, id, 'HELD', saga, lineage, failure, $4 FROM h
    RETURNING 1
)
SELECT (SELECT count(*) FROM h) AS held, (SELECT count(*) FROM ev) AS events

-- name: release
-- Held runs whose position a definition now fits ((saga, prefix) pairs $1, $2) are ready.
WITH r AS (
    UPDATE {q}.run r
       SET held = NULL, ready_at = clock_timestamp(), updated_at = clock_timestamp()
     WHERE r.held IS NOT NULL
       AND (r.saga, r.prefix) IN (SELECT * FROM unnest($1::text[], $2::text[]))
    RETURNING r.id, r.root_id, r.message_id, r.saga, r.lineage
), ev AS (
    INSERT INTO {q}.event (root_id, message_id, run_id, type, saga, lineage, worker)
    SELECT root_id, message_id, id, 'RELEASED', saga, lineage, $3 FROM r
    RETURNING 1
)
SELECT DISTINCT saga FROM r

-- name: unserved
-- Subscribed sagas with work waiting that no live worker serves, and since when nobody has.
WITH {_live}
SELECT s.saga, max(COALESCE(s.served_at, s.created_at)) AS last_served
  FROM {q}.subscription s
 WHERE NOT EXISTS (SELECT 1 FROM live WHERE live.saga = s.saga)
   AND EXISTS (SELECT 1 FROM {q}.run r
                WHERE r.saga = s.saga AND r.ready_at <= clock_timestamp() - make_interval(secs => $1))
 GROUP BY s.saga
 ORDER BY s.saga

-- name: expired
-- Subscriptions whose saga no live worker has served for longer than $1 seconds.
WITH {_live}
SELECT s.topic, s.saga
  FROM {q}.subscription s
 WHERE COALESCE(s.served_at, s.created_at) < clock_timestamp() - make_interval(secs => $1)
   AND NOT EXISTS (SELECT 1 FROM live WHERE live.saga = s.saga)
 ORDER BY s.topic, s.saga

-- name: topology
-- Every subscription with the live workers serving its saga ($1: the liveness timeout).
SELECT s.topic, s.saga, s.served_at, s.created_at,
       ARRAY(SELECT w.id FROM {q}.worker w
              WHERE w.sagas ? s.saga AND w.stopped_at IS NULL
                AND w.heartbeat_at > clock_timestamp() - make_interval(secs => $1)
              ORDER BY w.id) AS workers
  FROM {q}.subscription s
 ORDER BY s.topic, s.saga

-- name: waits
-- What each unfinished run of hierarchy $1 waits for ($2: the liveness timeout). A run in
-- the middle of a step is row-locked by its transaction, whose id is then the row's xmax.
WITH {_live}
SELECT r.id, r.saga, r.status, r.held, r.pending, r.ready_at, r.resume_at,
       r.ready_at IS NOT NULL AND r.ready_at <= clock_timestamp() AS due,
       EXISTS (SELECT 1 FROM {q}.paused_saga p WHERE p.saga = r.saga) AS paused,
       EXISTS (SELECT 1 FROM live WHERE live.saga = r.saga) AS served,
       (SELECT max(COALESCE(s.served_at, s.created_at)) FROM {q}.subscription s
         WHERE s.saga = r.saga) AS last_served,
       (SELECT a.application_name FROM pg_stat_activity a
         WHERE a.backend_xid = r.xmax LIMIT 1) AS running_on,
       (SELECT max((s.value->'limits'->>'concurrency')::int)
          FROM {q}.worker w CROSS JOIN LATERAL jsonb_each(w.sagas) AS s(key, value)
         WHERE s.key = r.saga AND w.stopped_at IS NULL
           AND w.heartbeat_at > clock_timestamp() - make_interval(secs => $2)) AS concurrency,
       (SELECT count(*) FROM pg_locks l
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
           AND l.classid::bigint
               = hashtext('scoopy.limit:{schema}:' || r.saga)::bigint & 4294967295) AS slots_taken,
       (SELECT rl.tat FROM {q}.rate_limit rl
         WHERE rl.saga = r.saga AND rl.tat > clock_timestamp()) AS rate_until
  FROM {q}.run r
 WHERE r.root_id = $1 AND r.status IN ('pending', 'active')
 ORDER BY r.created_at, r.id
