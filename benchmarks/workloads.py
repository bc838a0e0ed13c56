"""Timed scoopy workloads, each on its own fresh schema.

Planner statistics matter more than one would like (see README): the backlog workloads
ANALYZE the schema once the backlog is queued, so the planner knows the tables as they
are while the clock runs (never-analyzed tables make the flat workload 2-3x slower and
erratic; `analyze=False` measures that on purpose). The closed-loop workloads leave the
fresh tables unanalyzed: statistics taken after a small warm-up would describe tables far
smaller than the timed window makes them, and measurably slow the engine down, while
unanalyzed tables perform like ones with a large, analyzed history.

Two ways of driving the engine:
- backlog (throughput): the root saga is paused, N roots are launched, and the clock runs
  from `resume` until the last hierarchy's "done" notification. Only the engine works
  while the clock runs; nothing polls for outcomes.
- closed loop (latency, and the DBOS comparison): K clients each launch a hierarchy and
  `await handle.wait()`, as an application would, until N have finished.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from scoopy import Cooperation, Saga

from . import sagas
from .pg import connect, fresh_schema
from .settings import Settings
from .watch import ChannelWatch


@dataclass(frozen=True, slots=True)
class Timed:
    hierarchies: int
    seconds: float
    steps: int  # user step invocations

    @property
    def per_s(self) -> float:
        return self.hierarchies / self.seconds

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds


@dataclass(frozen=True, slots=True)
class Latencies:
    samples_ms: list[float]
    negative: int  # samples below zero: a clock disagreement, reported rather than hidden

    def percentile(self, q: float) -> float:
        ordered = sorted(self.samples_ms)
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    def summary(self) -> dict[str, float]:
        return {
            "n": len(self.samples_ms),
            "p50_ms": self.percentile(0.50),
            "p90_ms": self.percentile(0.90),
            "p99_ms": self.percentile(0.99),
            "max_ms": max(self.samples_ms),
            "mean_ms": statistics.fmean(self.samples_ms),
            "negative": self.negative,
        }


@dataclass
class Session:
    dsn: str
    coop: Cooperation
    watch: ChannelWatch
    settings: Settings
    analyze: bool = True
    launched: int = 0
    hierarchies: list[uuid.UUID] = field(default_factory=list)


@asynccontextmanager
async def session(
    dsn: str,
    schema: str,
    settings: Settings,
    subscriptions: list[tuple[str, Saga]],
    engine_dsn: str | None = None,
    analyze: bool = True,
) -> AsyncIterator[Session]:
    """A started Cooperation serving `subscriptions`, and a watcher on its channel.

    `engine_dsn` routes the engine's own connections elsewhere (through the relay).
    """
    coop = Cooperation(
        engine_dsn or dsn,
        schema=schema,
        pool_size=settings.pool_size,
        listen=True,
        shutdown_grace=10.0,
    )
    sagas.subscribe(coop, subscriptions)
    async with coop, ChannelWatch(dsn, coop.store.channel) as watch:
        yield Session(dsn, coop, watch, settings, analyze)


def payload(index: int, seed: int) -> dict[str, int]:
    return {"i": index, "seed": seed}


async def launch_many(
    coop: Cooperation, topic: str, count: int, settings: Settings, first: int = 0
) -> list[uuid.UUID]:
    """Launch `count` roots, `concurrency` launches at a time; return their ids in order."""
    roots: list[uuid.UUID | None] = [None] * count
    cursor = 0

    async def launcher() -> None:
        nonlocal cursor
        while cursor < count:
            index = cursor
            cursor += 1
            handle = await coop.launch(topic, payload(first + index, settings.seed))
            roots[index] = handle.id

    async with anyio.create_task_group() as tg:
        for _ in range(min(count, settings.concurrency)):
            tg.start_soon(launcher)
    return [root for root in roots if root is not None]


async def launch_in_transactions(
    coop: Cooperation, topic: str, count: int, settings: Settings, parallel: int, first: int = 0
) -> list[uuid.UUID]:
    """Launch `count` roots over `parallel` connections, each launching its share inside
    one transaction (one round trip per launch, one commit per connection): a bulk enqueue,
    for backlogs whose runs wait behind a paused saga until the clock starts."""
    shares = [range(first + k, first + count, parallel) for k in range(parallel)]
    roots: list[list[uuid.UUID]] = [[] for _ in shares]

    async def launcher(index: int) -> None:
        async with coop.pool.acquire() as conn, conn.transaction():
            for i in shares[index]:
                handle = await coop.launch(topic, payload(i, settings.seed), connection=conn)
                roots[index].append(handle.id)

    async with anyio.create_task_group() as tg:
        for index in range(parallel):
            tg.start_soon(launcher, index)
    return [root for share in roots for root in share]


async def verify(s: Session, roots: list[uuid.UUID], runs_each: int) -> None:
    """Every run of these hierarchies committed, and there are as many as the shape says."""
    await verify_roots(s.dsn, s.coop.schema, roots, runs_each)


async def verify_roots(dsn: str, schema: str, roots: list[uuid.UUID], runs_each: int) -> None:
    conn = await connect(dsn)
    try:
        rows = await conn.fetch(
            f'SELECT status, count(*) AS n FROM "{schema}".run '
            "WHERE root_id = ANY($1::uuid[]) GROUP BY status",
            roots,
        )
    finally:
        await conn.close()
    found = {row["status"]: row["n"] for row in rows}
    expected = {"committed": len(roots) * runs_each}
    if found != expected:
        raise RuntimeError(f"hierarchies did not all commit: expected {expected}, found {found}")


async def refresh_statistics(s: Session) -> None:
    """ANALYZE the session's schema (see the module's docstring for when and why)."""
    if s.analyze:
        await analyze_schema(s.dsn, s.coop.schema)


async def analyze_schema(dsn: str, schema: str) -> None:
    conn = await connect(dsn)
    try:
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
        for row in tables:
            await conn.execute(f'ANALYZE "{schema}"."{row["tablename"]}"')
    finally:
        await conn.close()


async def backlog(
    s: Session, topic: str, root_saga: str, count: int, runs_each: int, steps_each: int
) -> Timed:
    """Queue `count` roots behind a paused root saga, then time resume -> all finished."""
    await s.coop.pause(root_saga)
    roots = await launch_many(s.coop, topic, count, s.settings, s.launched)
    s.launched += count
    await refresh_statistics(s)
    s.watch.expect(roots)
    started = time.perf_counter()
    await s.coop.resume(root_saga)
    finished = await s.watch.all_done(s.settings.timeout)
    await verify(s, roots, runs_each)
    s.hierarchies += roots
    return Timed(count, finished - started, count * steps_each)


async def closed_loop(
    s: Session, topic: str, count: int, inflight: int, runs_each: int, steps_each: int
) -> tuple[Timed, list[uuid.UUID]]:
    """`inflight` clients, each launching a hierarchy and waiting for its outcome."""
    first = s.launched
    s.launched += count
    roots: list[uuid.UUID] = []
    cursor = 0

    async def client() -> None:
        nonlocal cursor
        while cursor < count:
            index = cursor
            cursor += 1
            handle = await s.coop.launch(topic, payload(first + index, s.settings.seed))
            outcome = await handle.wait(timeout=s.settings.timeout)
            if outcome.status != "committed":
                raise RuntimeError(f"hierarchy {handle.id} ended {outcome.status}")
            roots.append(handle.id)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(inflight):
            tg.start_soon(client)
    elapsed = time.perf_counter() - started
    await verify(s, roots, runs_each)
    return Timed(count, elapsed, count * steps_each), roots


# -- the workloads ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    """A hierarchy shape: its sagas, where it starts, and how big one hierarchy is."""

    subscriptions: Callable[[int], list[tuple[str, Saga]]]
    topic: str
    root_saga: str
    runs_each: int
    steps_each: int


FLAT = Shape(sagas.flat, "flat", "flat", runs_each=1, steps_each=2)
ONE_STEP = Shape(sagas.one_step, "one_step", "one_step", runs_each=1, steps_each=1)
PACED = Shape(sagas.paced, "paced", "paced", runs_each=1, steps_each=1)
FANOUT = Shape(
    sagas.fanout, "fan_root", "fan_root", runs_each=1 + sagas.FANOUT, steps_each=1 + sagas.FANOUT
)
DEEP = Shape(sagas.deep, "deep_1", "deep_1", runs_each=sagas.DEPTH, steps_each=sagas.DEPTH)


async def throughput(
    dsn: str,
    settings: Settings,
    shape: Shape,
    count: int,
    schema: str | None = None,
    analyze: bool = True,
) -> Timed:
    """One repetition: warm up, then time a backlog of `count` hierarchies.

    With `schema`, run on that (already populated) schema instead of a fresh one.
    """

    async def run(name: str) -> Timed:
        subscriptions = shape.subscriptions(settings.concurrency)
        async with session(dsn, name, settings, subscriptions, analyze=analyze) as s:
            await backlog(
                s, shape.topic, shape.root_saga, settings.warmup, shape.runs_each, shape.steps_each
            )
            return await backlog(
                s, shape.topic, shape.root_saga, count, shape.runs_each, shape.steps_each
            )

    if schema is not None:
        return await run(schema)
    async with fresh_schema(dsn, shape.root_saga) as name:
        return await run(name)


async def wakeup(dsn: str, settings: Settings) -> tuple[Timed, Latencies]:
    """Child COMMITTED (clock_timestamp() in its final transaction) -> parent's next step.

    Both clocks are the host's wall clock. The event row is written by the child's final
    statement, just before COMMIT, so each sample includes the child's commit (WAL flush)
    on top of the notification, the claim and the parent's step start: it errs high.
    """
    started: dict[uuid.UUID, float] = {}
    async with (
        fresh_schema(dsn, "wakeup") as schema,
        session(dsn, schema, settings, sagas.wakeup(settings.concurrency, started)) as s,
    ):
        await closed_loop(s, "wake_parent", settings.warmup, settings.wakeup_inflight, 2, 3)
        timed, roots = await closed_loop(
            s,
            "wake_parent",
            settings.wakeup_hierarchies,
            settings.wakeup_inflight,
            runs_each=2,
            steps_each=3,
        )
        conn = await connect(dsn)
        try:
            rows = await conn.fetch(
                f"""SELECT r.parent_id, extract(epoch FROM e.created_at)::float8 AS committed
                      FROM "{schema}".run r
                      JOIN "{schema}".event e
                        ON e.root_id = r.root_id AND e.run_id = r.id AND e.type = 'COMMITTED'
                     WHERE r.saga = 'wake_child' AND r.root_id = ANY($1::uuid[])""",
                roots,
            )
        finally:
            await conn.close()
    samples = [(started[row["parent_id"]] - row["committed"]) * 1000 for row in rows]
    if len(samples) != len(roots):
        raise RuntimeError(f"expected {len(roots)} wake-ups, measured {len(samples)}")
    return timed, Latencies(samples, sum(1 for x in samples if x < 0))


async def pair(dsn: str, settings: Settings) -> Timed:
    """The scoopy side of the DBOS comparison: parent + one child, `concurrency` in flight."""
    async with (
        fresh_schema(dsn, "pair") as schema,
        session(dsn, schema, settings, sagas.pair(settings.concurrency)) as s,
    ):
        await closed_loop(s, "pair_parent", settings.warmup, settings.concurrency, 2, 2)
        timed, _ = await closed_loop(
            s,
            "pair_parent",
            settings.dbos_hierarchies,
            settings.concurrency,
            runs_each=2,
            steps_each=2,
        )
        return timed


def describe(timed: Timed) -> dict[str, Any]:
    return {
        "hierarchies": timed.hierarchies,
        "seconds": timed.seconds,
        "per_s": timed.per_s,
        "steps_per_s": timed.steps_per_s,
    }
