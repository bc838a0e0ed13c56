"""The ceiling: raw asyncpg doing what one scoopy step does to the database, and nothing else.

One transaction is: BEGIN; claim the oldest ready row of a queue-like table with
SELECT ... FOR UPDATE SKIP LOCKED; insert three event rows; update the claimed row;
COMMIT. That is five round trips, the fewest this shape allows with asyncpg without
folding statements together:
- the three event rows go in one INSERT ... SELECT FROM unnest($n::type[]) (one round
  trip; three single-row INSERTs would cost two more, and executemany batches
  Bind/Execute pairs but is slower than unnest for three rows);
- each worker keeps its own connection (no pool: no acquire/release, no reset query);
- statements are prepared once per connection by asyncpg's statement cache.
With `fold`, each COMMIT goes out with the next transaction's BEGIN (`COMMIT; BEGIN`, one
simple query): four round trips, the trick a scoopy worker uses when it claims again right
after a step (scoopy/engine/handover.py). The target ratio is taken against the unfolded
ceiling, the idiomatic `async with conn.transaction()` per transaction; the folded one is
reported beside it so that the round trip scoopy saves is not hidden in the ratio.
The tables mimic scoopy's `run` (partial "ready" index, jsonb state) and `event` (identity
key, uuid[] lineage, index on (root_id, seq)), and the UPDATE re-queues the row at the
tail, so the claim sees the same index churn as scoopy's.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass

import anyio

from .pg import Conn, connect

QUEUE_ROWS = 2_000  # far more than the workers in flight, so SKIP LOCKED rarely skips far
EVENT_TYPES = ["SEEN", "SUSPENDED", "COMMITTED"]


def _ddl(q: str) -> list[str]:
    return [
        f'CREATE SCHEMA "{q}"',
        f"""CREATE TABLE "{q}".run (
                id         uuid PRIMARY KEY,
                root_id    uuid NOT NULL,
                saga       text NOT NULL,
                lineage    uuid[] NOT NULL,
                state      jsonb NOT NULL DEFAULT '{{}}',
                ready_at   timestamptz,
                updated_at timestamptz NOT NULL DEFAULT clock_timestamp())""",
        f'CREATE INDEX ON "{q}".run (saga, ready_at) WHERE ready_at IS NOT NULL',
        f"""CREATE TABLE "{q}".event (
                seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                root_id    uuid NOT NULL,
                run_id     uuid,
                type       text NOT NULL,
                saga       text,
                lineage    uuid[] NOT NULL,
                worker     text,
                created_at timestamptz NOT NULL DEFAULT clock_timestamp())""",
        f'CREATE INDEX ON "{q}".event (root_id, seq)',
    ]


@dataclass(frozen=True, slots=True)
class CeilingResult:
    transactions: int
    seconds: float
    connections: int

    @property
    def tps(self) -> float:
        return self.transactions / self.seconds


class _Queue:
    def __init__(self, schema: str, total: int) -> None:
        q = schema
        self.remaining = total
        self.claim = f"""
            SELECT id, root_id, lineage, state::text
              FROM "{q}".run
             WHERE saga = 'ceiling' AND ready_at <= clock_timestamp()
             ORDER BY ready_at
             LIMIT 1
               FOR UPDATE SKIP LOCKED"""
        self.insert = f"""
            INSERT INTO "{q}".event (root_id, run_id, type, saga, lineage, worker)
            SELECT $1, $2, t, 'ceiling', $3, 'bench' FROM unnest($4::text[]) AS t"""
        self.update = f"""
            UPDATE "{q}".run
               SET ready_at = clock_timestamp(), state = $2::jsonb,
                   updated_at = clock_timestamp()
             WHERE id = $1"""

    def take(self) -> bool:
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True

    async def work(self, conn: Conn, step: int) -> None:
        """One transaction's statements (the caller begins and commits)."""
        row = await conn.fetchrow(self.claim)
        if row is None:
            raise RuntimeError("the ceiling's queue ran dry: raise QUEUE_ROWS")
        await conn.execute(self.insert, row["root_id"], row["id"], row["lineage"], EVENT_TYPES)
        await conn.execute(self.update, row["id"], f'{{"seq": {step}}}')


async def _prepare(conn: Conn, schema: str, seed: int) -> None:
    for statement in _ddl(schema):
        await conn.execute(statement)
    rng = random.Random(seed)
    rows = []
    for _ in range(QUEUE_ROWS):
        root = uuid.UUID(int=rng.getrandbits(128), version=4)
        run = uuid.UUID(int=rng.getrandbits(128), version=4)
        rows.append((run, root, [root, run]))
    await conn.executemany(
        f"""INSERT INTO "{schema}".run (id, root_id, saga, lineage, ready_at)
            VALUES ($1, $2, 'ceiling', $3, clock_timestamp())""",
        rows,
    )
    await conn.execute(f'VACUUM ANALYZE "{schema}".run')


async def _drive(conns: list[Conn], queue: _Queue, fold: bool = False) -> None:
    async def worker(conn: Conn) -> None:
        step = 0
        if not fold:
            while queue.take():
                step += 1
                async with conn.transaction():
                    await queue.work(conn, step)
            return
        # Folded: each COMMIT carries the next BEGIN, as a scoopy worker under load does.
        if not queue.take():
            return
        await conn.execute("BEGIN")
        while True:
            step += 1
            await queue.work(conn, step)
            if not queue.take():
                await conn.execute("COMMIT")
                return
            await conn.execute("COMMIT; BEGIN")

    async with anyio.create_task_group() as tg:
        for conn in conns:
            tg.start_soon(worker, conn)


async def measure(
    dsn: str,
    schema: str,
    connections: int,
    transactions: int,
    warmup: int,
    seed: int,
    fold: bool = False,
) -> CeilingResult:
    """Run `transactions` step-shaped transactions over `connections` connections.

    `fold` sends each COMMIT with the next BEGIN (four round trips instead of five).
    """
    admin = await connect(dsn)
    conns: list[Conn] = []
    try:
        await _prepare(admin, schema, seed)
        conns = [await connect(dsn) for _ in range(connections)]
        await _drive(conns, _Queue(schema, warmup), fold)
        queue = _Queue(schema, transactions)
        started = time.perf_counter()
        await _drive(conns, queue, fold)
        elapsed = time.perf_counter() - started
        return CeilingResult(transactions, elapsed, connections)
    finally:
        for conn in conns:
            await conn.close()
        await admin.close()
