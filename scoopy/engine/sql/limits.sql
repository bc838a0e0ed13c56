-- Flow control: cluster-wide concurrency slots, rate limits, priorities.

-- name: take_slot
-- One of the $2 concurrency slots of saga $1, held by this transaction until it ends (so a
-- crash frees it); NULL when all are taken.
SELECT s FROM generate_series(0, $2 - 1) AS s
 WHERE pg_try_advisory_xact_lock(hashtext('scoopy.limit:{schema}:' || $1), s)
 LIMIT 1

-- name: take_token
-- A start of saga $1 under its rate limit (one per $2 seconds), taken in a transaction of its
-- own so that no step holds the row: `taken`, or else how long until the next is free.
-- Starts keep to a grid $2 apart and never come early; one that comes less than half an
-- interval late keeps its slot on the grid (a claim's latency costs the rate nothing), while
-- after a longer pause the grid starts again from now (no burst to catch up).
WITH up AS (
    INSERT INTO {q}.rate_limit AS r (saga, tat)
    VALUES ($1, clock_timestamp() + make_interval(secs => $2))
    ON CONFLICT (saga) DO UPDATE
       SET tat = GREATEST(r.tat, clock_timestamp() - make_interval(secs => $2 / 2))
                 + make_interval(secs => $2)
     WHERE r.tat <= clock_timestamp()
    RETURNING 1
)
SELECT (SELECT count(*) FROM up) > 0 AS taken,
       (SELECT EXTRACT(epoch FROM r.tat - clock_timestamp())::float8
          FROM {q}.rate_limit r WHERE r.saga = $1) AS wait

-- name: refund_token
-- A start taken for a claim that found no run.
UPDATE {q}.rate_limit SET tat = tat - make_interval(secs => $2) WHERE saga = $1

-- name: claim_priority
-- The highest-priority ready run of saga $1 (then the oldest), like `claim` otherwise.
WITH r AS (
    SELECT {_run_columns}
      FROM {q}.run
    WHERE saga = $1 AND priority > 0 AND {_claimable}
     ORDER BY priority DESC, ready_at
     LIMIT 1
       FOR UPDATE SKIP LOCKED
)
{_claimed}
