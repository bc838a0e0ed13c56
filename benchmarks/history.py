"""Loading a large history of finished runs in bulk, shaped exactly like real ones.

A real hierarchy of the measured saga, run by the engine, is the template: its message,
its run and its events are copied N times by INSERT ... SELECT over generate_series,
with fresh ids (uuidv7 for messages and therefore root ids, gen_random_uuid for runs,
as the engine makes them), the template's state/payload/context, status 'committed',
ready_at NULL and timestamps spread over the day before. Then VACUUM ANALYZE, so the
planner and the visibility map see the tables as a long-running system's would, and a
CHECKPOINT, so the timed runs do not pay for flushing the load.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass

import asyncpg

from .pg import connect


@dataclass(frozen=True, slots=True)
class Loaded:
    runs: int
    events: int
    seconds: float
    bytes: int


def _ids(runs: int) -> list[tuple[str, tuple[object, ...]]]:
    return [
        (
            """CREATE TEMP TABLE bench_ids (g int, mid uuid, rid uuid, at timestamptz)
               ON COMMIT DROP""",
            (),
        ),
        (
            """INSERT INTO bench_ids
               SELECT g,
                      uuidv7(-make_interval(secs => 86400.0 * ($1 - g + 1) / $1)),
                      gen_random_uuid(),
                      now() - make_interval(secs => 86400.0 * ($1 - g + 1) / $1)
                 FROM generate_series(1, $1::int) AS g""",
            (runs,),
        ),
    ]


def _copies(q: str) -> list[str]:
    # $1 is the template root id.
    return [
        f"""INSERT INTO "{q}".message (id, root_id, topic, payload, context, parent_run_id,
                                       parent_instance, created_at, key)
            SELECT i.mid, i.mid, t.topic, t.payload, t.context, NULL, NULL, i.at, NULL
              FROM bench_ids i, "{q}".message t
             WHERE t.id = $1""",
        f"""INSERT INTO "{q}".run (id, root_id, message_id, saga, parent_id, parent_instance,
                                   parent_wait, awaited, lineage, status, state, pending,
                                   failed, ready_at, resume_at, deadline_at, context, failure,
                                   rollback_failure, result, rollback_request, created_at,
                                   updated_at)
            SELECT i.rid, i.mid, i.mid, t.saga, NULL, NULL, NULL, false,
                   ARRAY[i.mid, i.rid], 'committed', t.state, 0, 0, NULL, NULL, NULL,
                   t.context, NULL, NULL, t.result, NULL, i.at, i.at
              FROM bench_ids i, "{q}".run t
             WHERE t.root_id = $1 AND t.status = 'committed'""",
        f"""INSERT INTO "{q}".event (root_id, message_id, run_id, type, saga, step, phase,
                                     step_index, instance, iteration, handler_iteration,
                                     lineage, worker, failure, context, created_at)
            SELECT i.mid, i.mid, CASE WHEN e.run_id IS NULL THEN NULL ELSE i.rid END,
                   e.type, e.saga, e.step, e.phase, e.step_index, e.instance, e.iteration,
                   e.handler_iteration,
                   CASE WHEN cardinality(e.lineage) = 1 THEN ARRAY[i.mid]
                        ELSE ARRAY[i.mid, i.rid] END,
                   e.worker, e.failure, e.context, i.at
              FROM bench_ids i, "{q}".event e
             WHERE e.root_id = $1""",
    ]


async def load(dsn: str, schema: str, template_root: uuid.UUID, runs: int) -> Loaded:
    """Add `runs` finished copies of the hierarchy `template_root` (one root run)."""
    conn = await connect(dsn)
    started = time.perf_counter()
    try:
        events_each = await conn.fetchval(
            f'SELECT count(*) FROM "{schema}".event WHERE root_id = $1', template_root
        )
        runs_each = await conn.fetchval(
            f'SELECT count(*) FROM "{schema}".run WHERE root_id = $1', template_root
        )
        if runs_each != 1:
            raise RuntimeError(f"the template hierarchy must be one run, it has {runs_each}")
        # One transaction: the temporary id table lives exactly as long as the load.
        async with conn.transaction():
            for statement, args in _ids(runs):
                await conn.execute(statement, *args)
            for statement in _copies(schema):
                await conn.execute(statement, template_root)
        for table in ("message", "run", "event"):
            await conn.execute(f'VACUUM ANALYZE "{schema}".{table}')
        # Not a superuser on --dsn: the timed runs may then share a checkpoint.
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CHECKPOINT")
        size = await conn.fetchval(
            "SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = $1 AND c.relkind = 'r'",
            schema,
        )
    finally:
        await conn.close()
    return Loaded(runs, runs * int(events_each), time.perf_counter() - started, int(size or 0))
