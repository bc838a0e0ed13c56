"""Issue 15, flow control: limits that hold across worker processes, priorities, fairness."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeAlias

import asyncpg

from scoopy import Cooperation, Message, Saga, Scope

from .helpers import WAIT, WorkerProcess, eventually

MakeCoop = Callable[..., Cooperation]
Db: TypeAlias = "asyncpg.Connection[asyncpg.Record]"
APP = "tests.apps.limited:setup"


async def spans(db: Db, saga: str) -> list[asyncpg.Record]:
    return list(await db.fetch("SELECT * FROM span WHERE saga = $1 ORDER BY started", saga))


def most_at_once(rows: list[asyncpg.Record]) -> int:
    """The largest number of recorded spans that overlapped at one instant."""
    edges = sorted(
        [(row["started"], 1) for row in rows] + [(row["ended"], -1) for row in rows],
        key=lambda edge: (edge[0], edge[1]),  # an end before a start at the same instant
    )
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


async def make_span_table(db: Db) -> None:
    await db.execute(
        "CREATE TABLE span (saga text, kind text, started timestamptz, ended timestamptz, pid int)"
    )


async def test_a_global_concurrency_limit_holds_across_three_processes(
    make_coop: MakeCoop, db: Db, dsn: str, schema: str
) -> None:
    await make_span_table(db)
    async with (
        WorkerProcess(dsn, schema, APP) as one,
        WorkerProcess(dsn, schema, APP) as two,
        WorkerProcess(dsn, schema, APP) as three,
        make_coop(worker=False) as coop,
    ):
        handles = [await coop.launch("slow", {"n": n, "fail": n % 3 == 0}) for n in range(60)]
        outcomes = [await handle.wait(timeout=WAIT) for handle in handles]
    rows = await spans(db, "slow")
    assert [o.status for o in outcomes].count("rolled_back") == 20
    assert len(rows) == 80  # 60 steps and 20 compensations
    assert len({row["pid"] for row in rows} & {one.pid, two.pid, three.pid}) >= 2
    assert most_at_once(rows) == 2  # without the limit, 3 (one per process)


async def test_a_rate_limit_holds_across_three_processes(
    make_coop: MakeCoop, db: Db, dsn: str, schema: str
) -> None:
    await make_span_table(db)
    async with (
        WorkerProcess(dsn, schema, APP),
        WorkerProcess(dsn, schema, APP),
        WorkerProcess(dsn, schema, APP),
        make_coop(worker=False) as coop,
    ):
        await coop.pause("paced")
        async with coop.pool.acquire() as conn, conn.transaction():
            for n in range(400):
                await coop.launch("paced", {"n": n}, connection=conn)
        await coop.resume("paced")

        async def ten_seconds_in() -> bool:
            rows = await spans(db, "paced")
            return bool(rows) and rows[-1]["started"] - rows[0]["started"] >= timedelta(
                seconds=10.5
            )

        await eventually(ten_seconds_in, timeout=60)
        await coop.pause("paced")
    starts: list[datetime] = [row["started"] for row in await spans(db, "paced")]
    first = starts[0]
    in_ten = [t for t in starts if t < first + timedelta(seconds=10)]
    assert 190 <= len(in_ten) <= 210, len(in_ten)
    for i, begin in enumerate(starts):  # every one-second window that starts at a start
        window = [t for t in starts[i:] if t < begin + timedelta(seconds=1)]
        assert len(window) <= 21, (begin, len(window))


def recorder(name: str, order: list[Any], **options: Any) -> Saga:
    saga = Saga(name, instances=1, **options)

    @saga.step()
    async def record(scope: Scope, message: Message[Any]) -> None:
        order.append(message.payload["n"])

    return saga


async def test_priorities_go_first_and_the_lowest_never_starves(make_coop: MakeCoop) -> None:
    order: list[str] = []
    async with make_coop() as coop:
        coop.subscribe("jobs", recorder("jobs", order, priorities=True))
        await coop.pause("jobs")
        handles = [await coop.launch("jobs", {"n": f"low{n}"}) for n in range(5)]
        handles += [await coop.launch("jobs", {"n": f"high{n}"}, priority=10) for n in range(40)]
        await coop.resume("jobs")
        for handle in handles:
            await handle.wait(timeout=WAIT)
    assert order[:7] == [f"high{n}" for n in range(7)]  # the highest first, oldest first
    assert sorted(order) == sorted(
        [*(f"low{n}" for n in range(5)), *(f"high{n}" for n in range(40))]
    )
    # Every eighth claim takes the oldest run: all the low ones run before the highs end.
    last_low = max(order.index(f"low{n}") for n in range(5))
    assert last_low < order.index("high39")


async def test_a_flood_of_one_saga_does_not_starve_another(make_coop: MakeCoop) -> None:
    flooded: list[int] = []
    trickle: list[int] = []
    async with make_coop() as coop:
        coop.subscribe("flood", recorder("flood", flooded))
        coop.subscribe("trickle", recorder("trickle", trickle))
        await coop.pause("flood")
        async with coop.pool.acquire() as conn, conn.transaction():
            for n in range(2000):
                await coop.launch("flood", {"n": n}, connection=conn)
        await coop.resume("flood")
        await eventually(lambda: _started(flooded))
        handles = [await coop.launch("trickle", {"n": n}) for n in range(5)]
        for handle in handles:
            await handle.wait(timeout=WAIT)
        done_when_trickle_finished = len(flooded)
        await coop.pause("flood")
    assert len(trickle) == 5
    assert done_when_trickle_finished < 2000  # the trickle did not wait for the flood


async def _started(seen: list[int]) -> bool:
    return len(seen) > 10


async def test_a_run_waiting_for_its_limit_says_so(
    make_coop: MakeCoop, db: Db, dsn: str, schema: str
) -> None:
    await make_span_table(db)
    async with (
        WorkerProcess(dsn, schema, APP),
        WorkerProcess(dsn, schema, APP),
        WorkerProcess(dsn, schema, APP),
        make_coop(worker=False) as coop,
    ):
        handles = [await coop.launch("slow", {"n": n}) for n in range(30)]
        found: list[str] = []

        async def limited() -> bool:
            for handle in handles:
                found.extend(w.detail for w in await coop.waiting_for(handle.id))
            return any("concurrency limit" in detail for detail in found)

        await eventually(limited)
        for handle in handles:
            await handle.wait(timeout=WAIT)
    assert any("(2 of 2 running)" in detail for detail in found), found
