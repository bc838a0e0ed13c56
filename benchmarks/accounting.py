"""How many SQL round trips a step costs, counted exactly on the wire (see `wire`).

An in-process `Cooperation` talks to PostgreSQL only through the relay while a backlog
of hierarchies runs; the counts between `resume` and the last hierarchy's end, divided
by the steps run, are the engine's cost per step, asyncpg's own traffic included.
Not timed: the relay adds latency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scoopy.engine import handover
from scoopy.engine.store import Store

from . import sagas
from .dsn import address
from .pg import fresh_schema
from .settings import Settings
from .wire import Tally, WireTap
from .workloads import (
    FANOUT,
    FLAT,
    ONE_STEP,
    Shape,
    backlog,
    closed_loop,
    launch_many,
    refresh_statistics,
    session,
    verify,
)

# asyncpg sends this when a pool connection is released (Connection.get_reset_query).
ROLLBACK = "ROLLBACK;"  # as asyncpg's Transaction sends it
POOL_RESET = "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;"


def labels(schema: str) -> dict[str, str]:
    """Statement text -> a short name: the engine's named statements, asyncpg's own."""
    found = {text: name for name, text in Store(schema).sql.items()}
    found[POOL_RESET] = "asyncpg pool reset"
    found[handover.QUERY] = "commit and begin"
    return found


@dataclass(frozen=True, slots=True)
class RoundTrips:
    shape: str
    hierarchies: int
    steps: int
    transactions: int  # step transactions that did something (see `transactions`)
    window: Tally

    @property
    def per_step(self) -> float:
        return self.window.total_round_trips / self.steps

    def describe(self) -> dict[str, Any]:
        return {
            "hierarchies": self.hierarchies,
            "round_trips_per_hierarchy": self.window.total_round_trips / self.hierarchies,
            "steps": self.steps,
            "transactions": self.transactions,
            "round_trips": self.window.total_round_trips,
            "round_trips_per_step": self.per_step,
            "round_trips_per_transaction": self.window.total_round_trips / self.transactions,
            "empty_claims": self.window.executions[ROLLBACK],
            "per_step_by_statement": {
                label: n / self.steps for label, n in self.window.round_trips.most_common()
            },
            "notifications_received": self.window.notifications,
        }


def transactions(window: Tally) -> int:
    """Step transactions that did something: claims that found a run.

    No step fails in these workloads, so the claims that found nothing are the ROLLBACKs.
    (Counting `finish` statements over-counts: a child's transaction may finish its parent
    too.)
    """
    return window.executions["claim"] - window.executions[ROLLBACK]


async def count(dsn: str, settings: Settings, shape: Shape, hierarchies: int) -> RoundTrips:
    async with (
        fresh_schema(dsn, "rt_" + shape.root_saga) as schema,
        WireTap(address(dsn), labels(schema)) as tap,
        session(
            dsn,
            schema,
            settings,
            shape.subscriptions(settings.concurrency),
            engine_dsn=tap.dsn(dsn),
        ) as s,
    ):
        # Warm: statements prepared, pool connections open, as in the timed runs.
        await backlog(s, shape.topic, shape.root_saga, settings.warmup, shape.runs_each, 0)
        await s.coop.pause(shape.root_saga)
        roots = await launch_many(s.coop, shape.topic, hierarchies, settings, s.launched)
        await refresh_statistics(s)  # as the timed runs do; over its own connection
        s.watch.expect(roots)
        before = tap.snapshot()
        await s.coop.resume(shape.root_saga)
        await s.watch.all_done(settings.timeout)
        after = tap.snapshot()
        await verify(s, roots, shape.runs_each)
    window = after - before
    return RoundTrips(
        shape.root_saga,
        hierarchies,
        hierarchies * shape.steps_each,
        transactions(window),
        window,
    )


async def pair(dsn: str, settings: Settings, hierarchies: int) -> RoundTrips:
    """The DBOS comparison's hierarchy, driven as there: launch, then `handle.wait()`.

    Unlike the backlog counts, this includes what launching and waiting cost.
    """
    subscriptions = sagas.pair(settings.concurrency)
    async with (
        fresh_schema(dsn, "rt_pair") as schema,
        WireTap(address(dsn), labels(schema)) as tap,
        session(dsn, schema, settings, subscriptions, engine_dsn=tap.dsn(dsn)) as s,
    ):
        await closed_loop(s, "pair_parent", settings.warmup, settings.concurrency, 2, 2)
        before = tap.snapshot()
        await closed_loop(s, "pair_parent", hierarchies, settings.concurrency, 2, 2)
        window = tap.snapshot() - before
    return RoundTrips("pair", hierarchies, hierarchies * 2, transactions(window), window)


async def all_shapes(dsn: str, settings: Settings) -> list[RoundTrips]:
    return [
        await count(dsn, settings, FLAT, settings.roundtrip_roots),
        await count(dsn, settings, FANOUT, settings.roundtrip_roots),
        await pair(dsn, settings, settings.roundtrip_roots),
        await count(dsn, settings, ONE_STEP, settings.roundtrip_roots),
    ]
