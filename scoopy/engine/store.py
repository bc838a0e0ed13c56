"""Every SQL statement scoopy runs, and the records they read and write.

The schema name is validated (`check_schema`) and quoted once when the store is built;
no other value is ever spliced into SQL text.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
import msgspec

from ..errors import check_schema

if TYPE_CHECKING:
    Connection: TypeAlias = (
        asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]
    )
else:
    Connection = asyncpg.Connection


@dataclass(slots=True)
class NewMessage:
    id: uuid.UUID
    root_id: uuid.UUID
    topic: str
    payload: str
    context: str | None
    instance: int | None  # the emitting step instance; None for a launch outside the hierarchy
    key: str | None = None  # idempotency key: at most one message per key

    @property
    def scoped(self) -> bool:
        return self.instance is not None


class EventRow(msgspec.Struct, array_like=True, kw_only=True):
    """One event to append; sent to the database as a JSON array (field order matters)."""

    root_id: uuid.UUID
    type: str
    message_id: uuid.UUID | None = None
    run_id: uuid.UUID | None = None
    saga: str | None = None
    step: str | None = None
    phase: str | None = None
    step_index: int | None = None
    instance: int | None = None
    iteration: int | None = None
    handler_iteration: int | None = None
    failure: msgspec.Raw | None = None
    context: msgspec.Raw | None = None


_events = msgspec.json.Encoder()


@dataclass(slots=True)
class RunWrite:
    """The new state of a claimed run, written when its transaction ends."""

    run_id: uuid.UUID
    lineage: Sequence[uuid.UUID]
    status: str
    state: str
    pending: int
    reset_failed: bool
    ready_at: datetime | None
    resume_at: datetime | None
    deadline_at: datetime | None
    context: str | None
    failure: str | None = None
    rollback_failure: str | None = None
    result: str | None = None
    terminal: bool = False
    parent_id: uuid.UUID | None = None
    parent_failed: int = 0
    notify_parent: bool = False
    events: list[EventRow] = field(default_factory=list)
    notify: list[str] = field(default_factory=list)
    # On the happy path and about to sleep until `ready_at`: a cancellation that arrived
    # during the step must wake it instead (the canceller could not, the row was locked).
    sleeping: bool = False


@dataclass(frozen=True, slots=True)
class Claimed:
    id: uuid.UUID
    root_id: uuid.UUID
    message_id: uuid.UUID
    saga: str
    parent_id: uuid.UUID | None
    lineage: list[uuid.UUID]
    status: str
    state: str
    pending: int
    failed: int
    awaited: bool
    context: str | None
    rollback_request: str | None
    topic: str | None  # None if the run's message was deleted by hand
    payload: str | None
    cancellation: str | None
    now: datetime
    ready: int  # runs of this saga ready when claimed, this one and those held included (capped)


@dataclass(frozen=True, slots=True)
class ChildRow:
    saga: str
    id: uuid.UUID
    status: str
    failure: str | None
    rollback_failure: str | None


@dataclass(frozen=True, slots=True)
class HistoryRow:
    instance: int
    step_index: int
    iteration: int
    handler_iteration: int | None


@dataclass(frozen=True, slots=True)
class RootRun:
    id: uuid.UUID
    saga: str
    status: str
    failure: str | None
    rollback_failure: str | None


class Store:
    """SQL for one scoopy schema."""

    def __init__(self, schema: str) -> None:
        self.schema = check_schema(schema)
        q = '"' + schema + '"'
        self.channel = f"scoopy_{schema}"

        # A parent whose last awaited child just finished may go on now, unless it also
        # asked to sleep (then at resume_at), but never later than its deadline.
        parent_ready = """LEAST(COALESCE(p.deadline_at, 'infinity'),
                                GREATEST(clock_timestamp(), COALESCE(p.resume_at, '-infinity')))"""
        # Children a parent still waits for that no worker has started: they can be given
        # up on. One being started right now is locked, and so counts as started.
        unstarted = f"""
            SELECT id FROM {q}.run
             WHERE parent_id = $1 AND awaited AND status = 'pending'
               FOR UPDATE SKIP LOCKED"""
        self.lock_key = f"scoopy:{schema}"

        self.sql_create_schema = f"CREATE SCHEMA IF NOT EXISTS {q}"
        self.sql_create_versions = f"""
            CREATE TABLE IF NOT EXISTS {q}.schema_version (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
            )"""
        self.sql_versions_exist = "SELECT to_regclass($1) IS NOT NULL"
        self.versions_table = f"{q}.schema_version"
        self.sql_versions = f"SELECT version FROM {q}.schema_version ORDER BY version"
        self.sql_record_version = f"INSERT INTO {q}.schema_version (version, name) VALUES ($1, $2)"
        self.sql_search_path = f"SET LOCAL search_path TO {q}, public"
        self.sql_lock = "SELECT pg_advisory_lock(hashtext($1))"
        self.sql_unlock = "SELECT pg_advisory_unlock(hashtext($1))"
        self.sql_drop_schema = f"DROP SCHEMA IF EXISTS {q} CASCADE"

        # Lock first, then look: rows skipped because another worker holds them cost no
        # join and no cancellation probe. The locked row's columns come from the CTE, which
        # returns its newest version (re-reading `run` outside it could see an older one).
        # Every step transaction holds this lock shared from its claim to its commit, and
        # unsubscribing takes it exclusively: the skip of unstarted runs then sees every run
        # that a step emitted from the old registry (none is created after it, unskipped).
        # (`schema` is a validated identifier, not user input.)
        registry_lock = f"hashtext('scoopy.registry:{schema}')"
        fence = f"pg_advisory_xact_lock_shared({registry_lock})"
        self.sql_lock_registry = f"SELECT pg_advisory_xact_lock({registry_lock})"

        def claim(pick: str) -> str:
            return f"""
            WITH r AS (
                SELECT id, root_id, message_id, saga, parent_id, lineage, status, state,
                       pending, failed, awaited, context, rollback_request
                  FROM {q}.run
                {pick}
            )
            SELECT r.id, r.root_id, r.message_id, r.saga, r.parent_id, r.lineage, r.status,
                   r.state::text AS state, r.pending, r.failed, r.awaited,
                   r.context::text AS context, r.rollback_request::text AS rollback_request,
                   m.topic, m.payload::text AS payload,
                   (SELECT c.failure::text FROM {q}.cancellation c
                     WHERE c.target = ANY (r.lineage)
                     ORDER BY c.created_at LIMIT 1) AS cancellation,
                   (SELECT clock_timestamp() FROM {fence}) AS now,
                   (SELECT count(*) FROM (SELECT 1 FROM {q}.run x
                                           WHERE x.saga = r.saga
                                             AND x.ready_at <= clock_timestamp()
                                           LIMIT $2) AS x) AS ready
              FROM r LEFT JOIN {q}.message m ON m.id = r.message_id"""

        self.sql_claim = claim(
            f"""WHERE saga = $1 AND ready_at <= clock_timestamp()
                   AND NOT EXISTS (SELECT 1 FROM {q}.paused_saga p WHERE p.saga = $1)
                 ORDER BY ready_at
                 LIMIT 1
                   FOR UPDATE SKIP LOCKED"""
        )
        self.sql_reclaim = claim("WHERE id = $1 FOR UPDATE")
        # A parent settled in its last child's transaction, unless its saga is paused.
        self.sql_reclaim_unpaused = claim(
            f"""WHERE id = $1
                   AND NOT EXISTS (SELECT 1 FROM {q}.paused_saga p WHERE p.saga = run.saga)
                   FOR UPDATE"""
        )
        # A connection's first claim builds the generic plan it keeps until the tables are
        # ANALYZEd. Built on a table still small (a fresh deployment), that plan sorted every
        # ready run for each claim; built with these off, it walks run_ready_idx in order,
        # whatever the statistics say. Set and reset inside the claim's own transaction.
        self.sql_plan_by_index = (
            "SET LOCAL enable_sort = off; SET LOCAL enable_bitmapscan = off; "
            "SET LOCAL enable_seqscan = off"
        )
        self.sql_plan_reset = "RESET enable_sort; RESET enable_bitmapscan; RESET enable_seqscan"

        self.sql_emit = f"""
            WITH m AS (
                INSERT INTO {q}.message (id, root_id, topic, payload, context, parent_run_id,
                                         parent_instance, key)
                SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::jsonb[], $5::jsonb[],
                                     $6::uuid[], $7::int[], $9::text[])
                ON CONFLICT (key) WHERE key IS NOT NULL DO NOTHING
                RETURNING id, root_id, topic, context, parent_run_id, parent_instance
            ), x AS (
                SELECT gen_random_uuid() AS id, m.id AS message_id, m.root_id, m.context,
                       m.parent_run_id, m.parent_instance, s.saga
                  FROM m JOIN {q}.subscription s ON s.topic = m.topic
            ), r AS (
                INSERT INTO {q}.run (id, root_id, message_id, saga, parent_id, parent_instance,
                                     parent_wait, awaited, lineage, context, ready_at)
                SELECT x.id, x.root_id, x.message_id, x.saga, x.parent_run_id, x.parent_instance,
                       x.parent_instance, x.parent_run_id IS NOT NULL,
                       CASE WHEN x.parent_run_id IS NULL THEN ARRAY[x.root_id, x.id]
                            ELSE $8::uuid[] || x.id END,
                       x.context, clock_timestamp()
                  FROM x
                RETURNING message_id, saga
            )
            SELECT id AS message_id, NULL::text AS saga FROM m
            UNION ALL
            SELECT message_id, saga FROM r"""

        # Finishing a step is one statement, in three shapes: the parent's update and the
        # notifications cost executor set-up on every call even when they do nothing, and a
        # root run's step (most steps of a flat saga) needs neither. Parameters $1-$17 are
        # common to all three; `finish` picks the shape.
        events = f"""
            ev AS (
                -- One JSON array per event (EventRow's field order); the run's own events
                -- carry its lineage, a launch outside the hierarchy starts one of its own.
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
            )"""
        update = f"""
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
                   updated_at = clock_timestamp()
             WHERE id = $1"""
        self.sql_finish = f"""
            WITH {events}
            {update}
            RETURNING NULL::text AS parent_saga, NULL::int AS parent_pending"""
        self.sql_finish_notify = f"""
            WITH {events}, nt AS (SELECT pg_notify($18, n) FROM unnest($19::text[]) AS n)
            {update}
            RETURNING NULL::text AS parent_saga, NULL::int AS parent_pending,
                      (SELECT count(*) FROM nt) AS notified"""
        # The finished run was awaited by its parent: one child fewer to wait for, and the
        # parent's saga is woken when that was the last.
        self.sql_finish_parent = f"""
            WITH {events}, parent AS (
                UPDATE {q}.run p
                   SET pending = p.pending - 1,
                       failed = p.failed + $19,
                       ready_at = CASE WHEN p.pending = 1 THEN {parent_ready}
                                       ELSE p.ready_at END,
                       updated_at = clock_timestamp()
                 WHERE p.id = $18
                RETURNING p.saga, p.pending
            ), nt AS (
                SELECT pg_notify($20, n)
                  FROM (SELECT unnest($21::text[]) AS n
                        UNION ALL
                        SELECT 'r:' || saga FROM parent WHERE pending = 0 AND $22) AS q
            )
            {update}
            RETURNING (SELECT saga FROM parent) AS parent_saga,
                      (SELECT pending FROM parent) AS parent_pending,
                      (SELECT count(*) FROM nt) AS notified"""

        self.sql_defer = f"""
            UPDATE {q}.run SET ready_at = clock_timestamp() + make_interval(secs => $2)
             WHERE id = $1 AND ready_at IS NOT NULL"""

        self.sql_child_failures = f"""
            SELECT saga, id, status, failure::text AS failure,
                   rollback_failure::text AS rollback_failure
              FROM {q}.run
             WHERE parent_id = $1 AND parent_wait = $2
               AND status IN ('rolled_back', 'rollback_failed')
               AND (failure IS NOT NULL OR rollback_failure IS NOT NULL)
             ORDER BY created_at, id"""

        self.sql_history = f"""
            SELECT instance, step_index, iteration, handler_iteration
              FROM {q}.event
             WHERE root_id = $1 AND run_id = $2 AND type = 'SUSPENDED'
               AND phase IN ('step', 'handler')
             ORDER BY seq"""

        self.sql_committed_children = f"""
            SELECT id, context::text AS context
              FROM {q}.run
             WHERE parent_id = $1 AND parent_instance = $2 AND status = 'committed'
             ORDER BY id
               FOR UPDATE"""

        self.sql_rollback_children = f"""
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
            SELECT 'run', NULL, saga FROM kids"""

        self.sql_skip_unstarted = f"""
            WITH s AS ({unstarted}), u AS (
                UPDATE {q}.run r
                   SET status = 'skipped', awaited = false, ready_at = NULL,
                       updated_at = clock_timestamp()
                  FROM s WHERE r.id = s.id
                RETURNING 1
            )
            SELECT count(*) FROM u"""

        self.sql_launch = f"""
            WITH m AS (
                INSERT INTO {q}.message (id, root_id, topic, payload, context, key)
                VALUES ($1, $1, $2, $3::jsonb, $4::jsonb, $8)
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
                                     state)
                SELECT x.id, $1, $1, x.saga, ARRAY[$1::uuid, x.id], x.context, due.at,
                       CASE WHEN due.at > clock_timestamp()
                            THEN jsonb_build_object('resume_at', due.at) ELSE '{{}}' END
                  FROM x, due
                RETURNING saga, ready_at
            ), nt AS (
                SELECT pg_notify($6, 'r:' || saga)
                  FROM (SELECT DISTINCT saga FROM r WHERE ready_at <= clock_timestamp()) d
                 WHERE $7
            )
            SELECT (SELECT count(*) FROM m) AS inserted, (SELECT count(*) FROM ev) AS events,
                   (SELECT count(*) FROM nt) AS notified,
                   ARRAY(SELECT saga FROM r) AS sagas,
                   (SELECT id FROM {q}.message WHERE key = $8 AND NOT EXISTS (SELECT 1 FROM m))
                       AS existing"""

        self.sql_root_runs = f"""
            SELECT id, saga, status, failure::text AS failure,
                   rollback_failure::text AS rollback_failure
              FROM {q}.run WHERE root_id = $1 AND parent_id IS NULL AND message_id = $1
             ORDER BY saga"""

        self.sql_cancellation_of = f"""
            SELECT (SELECT c.failure::text FROM {q}.cancellation c
                     WHERE c.target = ANY ($1::uuid[]) ORDER BY c.created_at LIMIT 1),
                   clock_timestamp()"""

        self.sql_message_by_key = f"SELECT id FROM {q}.message WHERE key = $1"
        self.sql_now = "SELECT clock_timestamp()"
        self.sql_lock_xact = "SELECT pg_advisory_xact_lock(hashtext($1))"
        self.sql_schedules = f"""
            SELECT m.payload::text FROM {q}.run r JOIN {q}.message m ON m.id = r.message_id
             WHERE r.saga = $1 AND r.ready_at IS NOT NULL AND r.status IN ('pending', 'active')
               AND NOT EXISTS (SELECT 1 FROM {q}.cancellation c WHERE c.target = r.root_id)
             ORDER BY r.ready_at"""
        self.sql_active_chains = f"""
            SELECT DISTINCT r.root_id
              FROM {q}.run r JOIN {q}.message m ON m.id = r.message_id
             WHERE r.saga = $1 AND r.ready_at IS NOT NULL AND r.status IN ('pending', 'active')
               AND (m.key = $2 OR starts_with(m.key, $3))
               AND NOT EXISTS (SELECT 1 FROM {q}.cancellation c WHERE c.target = r.root_id)"""

        self.sql_child_results = f"""
            SELECT r.saga, r.result::text AS result, m.topic
              FROM {q}.run r JOIN {q}.message m ON m.id = r.message_id
             WHERE r.parent_id = $1 AND r.parent_instance >= $2 AND r.status = 'committed'
               AND r.result IS NOT NULL
             ORDER BY r.created_at, r.id"""

        self.sql_saga_in_lineage = f"""
            SELECT count(*) FROM {q}.run WHERE id = ANY ($1::uuid[]) AND saga = $2"""

        self.sql_detach_unstarted = f"""
            WITH s AS ({unstarted}), u AS (
                UPDATE {q}.run r
                   SET parent_id = NULL, parent_instance = NULL, parent_wait = NULL,
                       awaited = false, root_id = r.message_id,
                       lineage = ARRAY[r.message_id, r.id], updated_at = clock_timestamp()
                  FROM s WHERE r.id = s.id
                RETURNING 1
            )
            SELECT count(*) FROM u"""

        self.sql_pause = f"""
            INSERT INTO {q}.paused_saga (saga, reason) VALUES ($1, $2)
            ON CONFLICT (saga) DO UPDATE SET reason = EXCLUDED.reason"""
        self.sql_resume = f"""
            WITH d AS (DELETE FROM {q}.paused_saga WHERE saga = $1 RETURNING saga)
            SELECT pg_notify($2, 'r:' || saga) FROM d WHERE $3"""
        self.sql_paused = f"SELECT saga FROM {q}.paused_saga ORDER BY saga"

        self.sql_topic_of = f"SELECT topic FROM {q}.message WHERE id = $1"

        self.sql_run_by_id = f"""
            SELECT id, saga, status, failure::text AS failure,
                   rollback_failure::text AS rollback_failure
              FROM {q}.run WHERE id = $1"""

        self.sql_message_exists = f"SELECT EXISTS (SELECT 1 FROM {q}.message WHERE id = $1)"

        self.sql_events = f"""
            SELECT seq, type, saga, step, phase, step_index, instance, iteration,
                   handler_iteration, run_id, message_id, root_id, lineage, worker,
                   failure::text AS failure, context::text AS context, created_at
              FROM {q}.event WHERE root_id = $1 ORDER BY seq"""

        self.sql_runs_of = f"""
            SELECT id, saga, parent_id, status, lineage, message_id, created_at, updated_at,
                   failure::text AS failure, rollback_failure::text AS rollback_failure,
                   state::text AS state
              FROM {q}.run WHERE root_id = $1 ORDER BY created_at, id"""

        self.sql_poll = f"""
            SELECT s.saga,
                   (SELECT r.ready_at FROM {q}.run r
                     WHERE r.saga = s.saga AND r.ready_at IS NOT NULL
                     ORDER BY r.ready_at LIMIT 1) AS ready_at,
                   clock_timestamp() AS now
              FROM unnest($1::text[]) AS s(saga)"""

        self.sql_subscribe = f"""
            INSERT INTO {q}.subscription (topic, saga)
            SELECT * FROM unnest($1::text[], $2::text[])
            ON CONFLICT DO NOTHING"""

        self.sql_unsubscribe = f"""
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
                       ready_at = CASE WHEN p.pending = c.n THEN {parent_ready}
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
                   ARRAY(SELECT saga FROM p WHERE pending = 0) AS ready"""

        self.sql_subscriptions = f"SELECT topic, saga FROM {q}.subscription ORDER BY topic, saga"

        self.sql_find_root = f"""
            SELECT root_id, lineage FROM {q}.run WHERE id = $1
            UNION ALL
            SELECT id, ARRAY[id] FROM {q}.message WHERE id = $1 AND parent_run_id IS NULL
            LIMIT 1"""

        self.sql_cancel = f"""
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
            SELECT (SELECT count(*) FROM c) AS inserted, (SELECT count(*) FROM ev) AS events"""

        # Wake the runs of a cancelled sub-tree that wait (for time or for children) so they
        # give up now. Nothing about ready_at may be in the WHERE clause: it would be judged on
        # the row version before a committing step's update, and the row skipped. The SET is
        # computed on the locked, current version instead.
        wake_cancelled = f"""
            WITH w AS (
                UPDATE {q}.run r
                   SET ready_at = CASE WHEN r.ready_at IS NULL OR r.ready_at > clock_timestamp()
                                       THEN clock_timestamp() ELSE r.ready_at END
                 WHERE r.id IN (SELECT id FROM {q}.run
                                 WHERE root_id = $2 AND $1 = ANY (lineage)
                                   AND status IN ('pending', 'active') {{lock}})
                   AND r.status IN ('pending', 'active')
                RETURNING r.saga
            ), nt AS (
                SELECT pg_notify($3, 'r:' || saga) FROM (SELECT DISTINCT saga FROM w) d WHERE $4
            )
            SELECT (SELECT count(*) FROM w) AS woken, (SELECT count(*) FROM nt) AS notified"""
        self.sql_wake_cancelled = wake_cancelled.format(lock="")
        self.sql_wake_cancelled_unlocked = wake_cancelled.format(lock="FOR UPDATE SKIP LOCKED")
        self.sql_lock_timeout = "SET LOCAL lock_timeout = '250ms'"

        self.sql_undo_candidates = f"""
            SELECT id, saga, status, parent_id, lineage, message_id
              FROM {q}.run
             WHERE root_id = $1 AND ($2::uuid = root_id AND parent_id IS NULL OR id = $2)
               FOR UPDATE"""

        self.sql_unfinished_in_root = f"""
            SELECT count(*) FROM {q}.run
             WHERE root_id = $1 AND status IN ('pending', 'active')"""

        self.sql_undo = f"""
            WITH u AS (
                UPDATE {q}.run
                   SET status = 'active', rollback_request = $2::jsonb,
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
                   (SELECT count(*) FROM nt) AS notified"""

    # -- schema ----------------------------------------------------------------------------

    async def applied_versions(self, conn: Connection) -> list[int] | None:
        """Applied migration versions, or None when the schema was never migrated."""
        if not await conn.fetchval(self.sql_versions_exist, self.versions_table):
            return None
        return [row[0] for row in await conn.fetch(self.sql_versions)]

    async def apply_migrations(
        self, conn: Connection, migrations: Sequence[tuple[int, str, str]]
    ) -> list[int]:
        """Apply the migrations not yet applied, under an advisory lock; return their versions."""
        await conn.execute(self.sql_lock, self.lock_key)
        try:
            await conn.execute(self.sql_create_schema)
            await conn.execute(self.sql_create_versions)
            done = set(await self.applied_versions(conn) or [])
            applied: list[int] = []
            for version, name, sql in migrations:
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(self.sql_search_path)
                    await conn.execute(sql)
                    await conn.execute(self.sql_record_version, version, name)
                applied.append(version)
            return applied
        finally:
            await conn.execute(self.sql_unlock, self.lock_key)

    async def drop_schema(self, conn: Connection) -> None:
        await conn.execute(self.sql_drop_schema)

    # -- claiming and running --------------------------------------------------------------

    async def claim(self, conn: Connection, saga: str, count_up_to: int) -> Claimed | None:
        """Lock the oldest ready run of `saga`; also count ready runs, up to `count_up_to`."""
        row = await conn.fetchrow(self.sql_claim, saga, count_up_to)
        if row is None:
            return None
        return Claimed(*row)

    async def plan_claim(self, conn: Connection) -> None:
        """Have this connection plan `sql_claim` as an index walk (see `sql_plan_by_index`)."""
        await conn.execute(self.sql_plan_by_index)
        try:
            await conn.fetchrow(self.sql_claim, "", 0)  # no saga has an empty name
        finally:
            await conn.execute(self.sql_plan_reset)

    async def reclaim(
        self, conn: Connection, run_id: uuid.UUID, unless_paused: bool = False
    ) -> Claimed | None:
        """Lock one run by id, waiting for whoever holds it; None if it is gone (or, with
        `unless_paused`, if its saga is paused)."""
        sql = self.sql_reclaim_unpaused if unless_paused else self.sql_reclaim
        row = await conn.fetchrow(sql, run_id, 1)
        return None if row is None else Claimed(*row)

    async def emit(
        self, conn: Connection, messages: Sequence[NewMessage], emitter: Claimed
    ) -> tuple[set[uuid.UUID], list[tuple[uuid.UUID, str]]]:
        """Insert messages and one run per subscribed saga.

        Returns the ids of the messages inserted (a message whose key exists already is
        not) and a (message id, saga) pair per run created.
        """
        rows = await conn.fetch(
            self.sql_emit,
            [m.id for m in messages],
            [m.root_id for m in messages],
            [m.topic for m in messages],
            [m.payload for m in messages],
            [m.context for m in messages],
            [emitter.id if m.scoped else None for m in messages],
            [m.instance for m in messages],
            emitter.lineage,
            [m.key for m in messages],
        )
        inserted = {row[0] for row in rows if row[1] is None}
        return inserted, [(row[0], row[1]) for row in rows if row[1] is not None]

    async def finish(
        self, conn: Connection, write: RunWrite, worker: str, listen: bool
    ) -> tuple[str | None, int | None]:
        """Write the run's events and new state; return the parent's saga and pending count.

        Every event belongs to this run, or (run_id None) starts a hierarchy of its own.
        """
        ev = write.events
        assert all(e.run_id in (write.run_id, None) for e in ev)
        args = (
            write.run_id,
            write.status,
            write.state,
            write.pending,
            write.reset_failed,
            write.ready_at,
            write.resume_at,
            write.deadline_at,
            write.context,
            write.failure,
            write.rollback_failure,
            write.result,
            write.terminal,
            write.sleeping,
            _events.encode(ev).decode(),
            write.lineage,
            worker,
        )
        notify = write.notify if listen else []
        if write.notify_parent:
            row = await conn.fetchrow(
                self.sql_finish_parent,
                *args,
                write.parent_id,
                write.parent_failed,
                self.channel,
                notify,
                listen,
            )
        elif notify:
            row = await conn.fetchrow(self.sql_finish_notify, *args, self.channel, notify)
        else:
            row = await conn.fetchrow(self.sql_finish, *args)
        if row is None:
            raise RuntimeError(f"run {write.run_id} vanished while it was locked")
        return row[0], row[1]

    async def defer(self, conn: Connection, run_id: uuid.UUID, seconds: float) -> None:
        await conn.execute(self.sql_defer, run_id, seconds)

    async def child_failures(
        self, conn: Connection, parent_id: uuid.UUID, wait: int
    ) -> list[ChildRow]:
        rows = await conn.fetch(self.sql_child_failures, parent_id, wait)
        return [ChildRow(*row) for row in rows]

    async def history(
        self, conn: Connection, root_id: uuid.UUID, run_id: uuid.UUID
    ) -> list[HistoryRow]:
        rows = await conn.fetch(self.sql_history, root_id, run_id)
        return [HistoryRow(*row) for row in rows]

    async def rollback_children(
        self,
        conn: Connection,
        parent_id: uuid.UUID,
        instance: int,
        wait: int,
        request: str,
        contexts: dict[uuid.UUID, str | None],
    ) -> tuple[list[uuid.UUID], list[str]]:
        """Ask the committed children of one step instance (from `committed_children`) to
        roll back, each with the context given for it.

        Returns the messages that instance emitted and the sagas of the children asked.
        """
        rows = await conn.fetch(
            self.sql_rollback_children,
            parent_id,
            instance,
            request,
            wait,
            list(contexts),
            list(contexts.values()),
        )
        messages = sorted(row["message_id"] for row in rows if row["kind"] == "message")
        sagas = [row["saga"] for row in rows if row["kind"] == "run"]
        return messages, sagas

    async def committed_children(
        self, conn: Connection, parent_id: uuid.UUID, instance: int
    ) -> list[tuple[uuid.UUID, str | None]]:
        """Lock the committed children of one step instance; (id, context) of each."""
        rows = await conn.fetch(self.sql_committed_children, parent_id, instance)
        return [(row["id"], row["context"]) for row in rows]

    async def skip_unstarted(self, conn: Connection, parent_id: uuid.UUID) -> int:
        return int(await conn.fetchval(self.sql_skip_unstarted, parent_id))

    # -- launching, inspecting, controlling ------------------------------------------------

    async def launch(
        self,
        conn: Connection,
        message: NewMessage,
        worker: str,
        listen: bool,
        *,
        at: datetime | None = None,
        after: float | None = None,
    ) -> tuple[uuid.UUID, list[str]]:
        """Insert a root message and its runs; return its id and the sagas that got a run.

        With a key that exists already nothing is inserted and the existing id is returned.
        """
        row = await conn.fetchrow(
            self.sql_launch,
            message.id,
            message.topic,
            message.payload,
            message.context,
            worker,
            self.channel,
            listen,
            message.key,
            at,
            after,
        )
        assert row is not None
        if not row["inserted"]:
            existing = row["existing"]
            if existing is None:  # the other launch with this key has not committed yet
                existing = await conn.fetchval(self.sql_message_by_key, message.key)
            return existing, []
        return message.id, list(row["sagas"])

    async def root_runs(self, conn: Connection, root_id: uuid.UUID) -> list[RootRun]:
        rows = await conn.fetch(self.sql_root_runs, root_id)
        return [RootRun(*row) for row in rows]

    async def cancellation_of(
        self, conn: Connection, lineage: Sequence[uuid.UUID]
    ) -> tuple[str | None, datetime]:
        row = await conn.fetchrow(self.sql_cancellation_of, list(lineage))
        assert row is not None
        return row[0], row[1]

    async def topic_of(self, conn: Connection, message_id: uuid.UUID) -> str:
        return str(await conn.fetchval(self.sql_topic_of, message_id) or "")

    async def run_by_id(self, conn: Connection, run_id: uuid.UUID) -> RootRun | None:
        row = await conn.fetchrow(self.sql_run_by_id, run_id)
        return None if row is None else RootRun(*row)

    async def message_exists(self, conn: Connection, message_id: uuid.UUID) -> bool:
        return bool(await conn.fetchval(self.sql_message_exists, message_id))

    async def events(self, conn: Connection, root_id: uuid.UUID) -> list[asyncpg.Record]:
        return list(await conn.fetch(self.sql_events, root_id))

    async def runs_of(self, conn: Connection, root_id: uuid.UUID) -> list[asyncpg.Record]:
        return list(await conn.fetch(self.sql_runs_of, root_id))

    async def poll(
        self, conn: Connection, sagas: Sequence[str]
    ) -> tuple[list[tuple[str, datetime | None]], datetime | None]:
        rows = await conn.fetch(self.sql_poll, list(sagas))
        now = rows[0]["now"] if rows else None
        return [(row["saga"], row["ready_at"]) for row in rows], now

    async def subscribe(self, conn: Connection, pairs: Sequence[tuple[str, str]]) -> None:
        await conn.execute(
            self.sql_subscribe, [topic for topic, _ in pairs], [saga for _, saga in pairs]
        )

    async def unsubscribe(
        self, conn: Connection, topic: str, saga: str, listen: bool
    ) -> tuple[int, list[str]]:
        """Remove a subscription and skip that saga's runs on `topic` that have not started.

        Returns how many runs were skipped and the sagas of parents that became ready.
        """
        await conn.execute(self.sql_lock_registry)  # waits out steps emitting right now
        row = await conn.fetchrow(self.sql_unsubscribe, topic, saga, self.channel, listen)
        assert row is not None
        return int(row["skipped"]), list(row["ready"])

    async def pause(self, conn: Connection, saga: str, reason: str | None) -> None:
        await conn.execute(self.sql_pause, saga, reason)

    async def resume(self, conn: Connection, saga: str, listen: bool) -> None:
        await conn.execute(self.sql_resume, saga, self.channel, listen)

    async def paused(self, conn: Connection) -> list[str]:
        return [row[0] for row in await conn.fetch(self.sql_paused)]

    async def message_by_key(self, conn: Connection, key: str) -> uuid.UUID | None:
        value = await conn.fetchval(self.sql_message_by_key, key)
        return None if value is None else uuid.UUID(str(value))

    async def now(self, conn: Connection) -> datetime:
        value: datetime = await conn.fetchval(self.sql_now)
        return value

    async def lock(self, conn: Connection, name: str) -> None:
        """Serialize with other transactions taking the same named lock (until commit)."""
        await conn.execute(self.sql_lock_xact, f"{self.schema}:{name}")

    async def schedule_links(self, conn: Connection, saga: str) -> list[str]:
        """Payloads (JSON) of the schedule chain links still waiting or running."""
        return [row[0] for row in await conn.fetch(self.sql_schedules, saga)]

    async def active_chains(
        self, conn: Connection, saga: str, key: str, prefix: str
    ) -> list[uuid.UUID]:
        """Root ids of a schedule's chain links that are still waiting or running."""
        return [row[0] for row in await conn.fetch(self.sql_active_chains, saga, key, prefix)]

    async def child_results(
        self, conn: Connection, parent_id: uuid.UUID, instance: int
    ) -> list[tuple[str, str, str]]:
        """(saga, result JSON, topic) of the committed children of a step instance and of the
        child-failure handler instances that followed it (a retry's children count too)."""
        rows = await conn.fetch(self.sql_child_results, parent_id, instance)
        return [(row[0], row[1], row[2]) for row in rows]

    async def saga_in_lineage(
        self, conn: Connection, lineage: Sequence[uuid.UUID], saga: str
    ) -> int:
        return int(await conn.fetchval(self.sql_saga_in_lineage, list(lineage), saga))

    async def detach_unstarted(self, conn: Connection, parent_id: uuid.UUID) -> int:
        return int(await conn.fetchval(self.sql_detach_unstarted, parent_id))

    async def subscriptions(self, conn: Connection) -> list[tuple[str, str]]:
        return [(row[0], row[1]) for row in await conn.fetch(self.sql_subscriptions)]

    async def find_root(
        self, conn: Connection, target: uuid.UUID
    ) -> tuple[uuid.UUID, list[uuid.UUID]] | None:
        row = await conn.fetchrow(self.sql_find_root, target)
        return None if row is None else (row[0], list(row[1]))

    async def cancel(
        self,
        conn: Connection,
        target: uuid.UUID,
        root_id: uuid.UUID,
        lineage: Sequence[uuid.UUID],
        failure: str,
        worker: str,
        listen: bool,
    ) -> bool:
        """Record a cancellation request, then wake the waiting runs it concerns.

        The request commits first, so a step polling `give_up_if_needed` sees it at once.
        Runs in the middle of a long step are not waited for: they see the request when
        they finish (see `sql_finish`).
        """
        async with conn.transaction():
            row = await conn.fetchrow(
                self.sql_cancel, target, root_id, failure, list(lineage), worker
            )
            assert row is not None
        args = (target, root_id, self.channel, listen)
        try:
            async with conn.transaction():
                await conn.execute(self.sql_lock_timeout)
                await conn.execute(self.sql_wake_cancelled, *args)
        except asyncpg.exceptions.LockNotAvailableError:
            async with conn.transaction():
                await conn.execute(self.sql_wake_cancelled_unlocked, *args)
        return bool(row["inserted"])

    async def undo_candidates(
        self, conn: Connection, root_id: uuid.UUID, target: uuid.UUID
    ) -> list[asyncpg.Record]:
        return list(await conn.fetch(self.sql_undo_candidates, root_id, target))

    async def unfinished(self, conn: Connection, root_id: uuid.UUID) -> int:
        return int(await conn.fetchval(self.sql_unfinished_in_root, root_id))

    async def undo(
        self,
        conn: Connection,
        run_ids: Sequence[uuid.UUID],
        request: str,
        failure: str,
        worker: str,
        listen: bool,
    ) -> int:
        row = await conn.fetchrow(
            self.sql_undo, list(run_ids), request, failure, worker, self.channel, listen
        )
        assert row is not None
        return int(row["updated"])
