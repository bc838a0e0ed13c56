-- What a step transaction reads and writes besides the claim: the messages it emits, its
-- bookkeeping at the end, and what rollback and the strategies need on the way.

-- name: emit
-- Messages a step launched, and one run per saga subscribed to each topic (fan-out on
-- write). A message whose key exists already is not inserted and starts nothing.
WITH m AS (
    INSERT INTO {q}.message (id, root_id, topic, payload, context, parent_run_id,
                             parent_instance, key, priority)
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::jsonb[], $5::jsonb[],
                         $6::uuid[], $7::int[], $9::text[], $10::int[])
    ON CONFLICT (key) WHERE key IS NOT NULL DO NOTHING
    RETURNING id, root_id, topic, context, parent_run_id, parent_instance, priority
), x AS (
    SELECT gen_random_uuid() AS id, m.id AS message_id, m.root_id, m.context,
           m.parent_run_id, m.parent_instance, m.priority, s.saga
      FROM m JOIN {q}.subscription s ON s.topic = m.topic
), r AS (
    INSERT INTO {q}.run (id, root_id, message_id, saga, parent_id, parent_instance,
                         parent_wait, awaited, lineage, context, ready_at, priority)
    SELECT x.id, x.root_id, x.message_id, x.saga, x.parent_run_id, x.parent_instance,
           x.parent_instance, x.parent_run_id IS NOT NULL,
           CASE WHEN x.parent_run_id IS NULL THEN ARRAY[x.root_id, x.id]
                ELSE $8::uuid[] || x.id END,
           x.context, clock_timestamp(), x.priority
      FROM x
    RETURNING message_id, saga
)
SELECT id AS message_id, NULL::text AS saga FROM m
UNION ALL
SELECT message_id, saga FROM r

-- Finishing a step is one statement, in three shapes: the parent's update and the
-- notifications cost executor set-up on every call even when they do nothing, and a root
-- run's step (most steps of a flat saga) needs neither. Parameters $1-$19 are common to all
-- three (see Store.finish).

-- name: _parent_ready
-- A parent whose last awaited child just finished may go on now, unless it also asked to
-- sleep (then at resume_at), but never later than its deadline.
LEAST(COALESCE(p.deadline_at, 'infinity'),
      GREATEST(clock_timestamp(), COALESCE(p.resume_at, '-infinity')))

-- name: _events
-- One JSON array per event (NewEvent's field order); the run's own events carry its
-- lineage, a launch outside the hierarchy starts one of its own.
ev AS (
    INSERT INTO {q}.event (root_id, type, message_id, run_id, saga, step, phase,
                           step_index, instance, iteration, handler_iteration,
                           failure, context, lineage, worker)
    SELECT (e->>0)::uuid, e->>1, (e->>2)::uuid, (e->>3)::uuid, e->>4, e->>5, e->>6,
           (e->>7)::int, (e->>8)::int, (e->>9)::int, (e->>10)::int,
           NULLIF(e->11, 'null'), NULLIF(e->12, 'null'),
           CASE WHEN e->>3 IS NULL THEN ARRAY[(e->>0)::uuid] ELSE $16::uuid[] END,
           $17
      FROM jsonb_array_elements($15::jsonb) WITH ORDINALITY AS x(e, ord)
     ORDER BY x.ord
)

-- name: _run_update
-- A run about to sleep ($14) whose cancellation arrived while its step ran is woken
-- instead: the canceller could not wake it, the row was locked.
UPDATE {q}.run
   SET status = $2, state = $3::jsonb, pending = $4,
       failed = CASE WHEN $5 THEN 0 ELSE failed END,
       ready_at = CASE
           WHEN $14 AND $6 > clock_timestamp() AND EXISTS (
               SELECT 1 FROM {q}.cancellation c WHERE c.target = ANY (lineage))
           THEN clock_timestamp() ELSE $6 END,
       resume_at = $7, deadline_at = $8, context = $9::jsonb,
       failure = COALESCE($10::jsonb, failure),
       rollback_failure = $11::jsonb, result = COALESCE($12::jsonb, result),
       rollback_request = NULL,
       awaited = awaited AND NOT $13,
       definition = $18, prefix = $19,
       updated_at = clock_timestamp()
 WHERE id = $1

-- name: _cancelled
-- Whether the run or an ancestor is cancelled now (a new snapshot, after the step's code):
-- a step cancelled while it ran must not commit.
EXISTS (SELECT 1 FROM {q}.cancellation c WHERE c.target = ANY ($16::uuid[])) AS cancelled

-- name: finish
WITH {_events}
{_run_update}
RETURNING NULL::text AS parent_saga, NULL::int AS parent_pending, {_cancelled}

-- name: finish_notify
WITH {_events}, nt AS (SELECT pg_notify($20, n) FROM unnest($21::text[]) AS n)
{_run_update}
RETURNING NULL::text AS parent_saga, NULL::int AS parent_pending,
          (SELECT count(*) FROM nt) AS notified, {_cancelled}

-- name: finish_parent
-- The finished run was awaited by its parent: one child fewer to wait for, and the
-- parent's saga is woken when that was the last.
WITH {_events}, parent AS (
    UPDATE {q}.run p
       SET pending = p.pending - 1,
           failed = p.failed + $21,
           ready_at = CASE WHEN p.pending = 1 THEN {_parent_ready}
                           ELSE p.ready_at END,
           updated_at = clock_timestamp()
     WHERE p.id = $20
    RETURNING p.saga, p.pending
), nt AS (
    SELECT pg_notify($22, n)
      FROM (SELECT unnest($23::text[]) AS n
            UNION ALL
            SELECT 'r:' || saga FROM parent WHERE pending = 0 AND $24) AS q
)
{_run_update}
RETURNING (SELECT saga FROM parent) AS parent_saga,
          (SELECT pending FROM parent) AS parent_pending,
          (SELECT count(*) FROM nt) AS notified, {_cancelled}

-- name: child_failures
SELECT saga, id, status, failure::text AS failure,
       rollback_failure::text AS rollback_failure
  FROM {q}.run
 WHERE parent_id = $1 AND parent_wait = $2
   AND status IN ('rolled_back', 'rollback_failed')
   AND (failure IS NOT NULL OR rollback_failure IS NOT NULL)
 ORDER BY created_at, id

-- name: history
-- The run's committed step and handler instances: what its rollback has to undo. By step
-- name: positions count in the definition each instance ran under.
SELECT instance, step, iteration, handler_iteration
  FROM {q}.event
 WHERE root_id = $1 AND run_id = $2 AND type = 'SUSPENDED'
   AND phase IN ('step', 'handler')
 ORDER BY seq

-- name: committed_children
SELECT id, context::text AS context
  FROM {q}.run
 WHERE parent_id = $1 AND parent_instance = $2 AND status = 'committed'
 ORDER BY id
   FOR UPDATE

-- name: rollback_children
-- Ask the committed children of step instance $2 to roll back, each with its own context.
WITH kids AS (
    UPDATE {q}.run r
       SET status = 'active', rollback_request = $3::jsonb, context = g.context,
           ready_at = clock_timestamp(), awaited = true, parent_wait = $4,
           updated_at = clock_timestamp()
      FROM unnest($5::uuid[], $6::jsonb[]) AS g(id, context)
     WHERE r.id = g.id AND r.status = 'committed'
    RETURNING r.saga
)
SELECT 'message' AS kind, m.id AS message_id, NULL::text AS saga
  FROM {q}.message m
 WHERE m.parent_run_id = $1 AND m.parent_instance = $2
UNION ALL
SELECT 'run', NULL, saga FROM kids

-- name: _unstarted
-- Children a parent still waits for that no worker has started: they can be given up on.
-- One being started right now is locked, and so counts as started.
SELECT id FROM {q}.run
 WHERE parent_id = $1 AND awaited AND status = 'pending'
   FOR UPDATE SKIP LOCKED

-- name: skip_unstarted
WITH s AS ({_unstarted}), u AS (
    UPDATE {q}.run r
       SET status = 'skipped', awaited = false, ready_at = NULL,
           updated_at = clock_timestamp()
      FROM s WHERE r.id = s.id
    RETURNING 1
)
SELECT count(*) FROM u

-- name: detach_unstarted
-- The children run on, outside the hierarchy: each becomes the root run of its message.
WITH s AS ({_unstarted}), u AS (
    UPDATE {q}.run r
       SET parent_id = NULL, parent_instance = NULL, parent_wait = NULL,
           awaited = false, root_id = r.message_id,
           lineage = ARRAY[r.message_id, r.id], updated_at = clock_timestamp()
      FROM s WHERE r.id = s.id
    RETURNING 1
)
SELECT count(*) FROM u

-- name: cancellation_of
SELECT (SELECT c.failure::text FROM {q}.cancellation c
         WHERE c.target = ANY ($1::uuid[]) ORDER BY c.created_at LIMIT 1),
       clock_timestamp()

-- name: message_by_key
SELECT id FROM {q}.message WHERE key = $1

-- name: child_results
-- Results of the committed children of step instance $2 and of the child-failure handler
-- instances that followed it (a retry's children count too).
SELECT r.saga, r.result::text AS result, m.topic
  FROM {q}.run r JOIN {q}.message m ON m.id = r.message_id
 WHERE r.parent_id = $1 AND r.parent_instance >= $2 AND r.status = 'committed'
   AND r.result IS NOT NULL
 ORDER BY r.created_at, r.id

-- name: saga_in_lineage
SELECT count(*) FROM {q}.run WHERE id = ANY ($1::uuid[]) AND saga = $2

-- name: definition
SELECT steps::text FROM {q}.saga_definition WHERE saga = $1 AND fingerprint = $2

-- name: register_definitions
INSERT INTO {q}.saga_definition (saga, fingerprint, steps)
SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[])
ON CONFLICT DO NOTHING
