"""Several worker processes on one database; a worker killed mid-step loses nothing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import asyncpg

from scoopy import Cooperation, Message, Saga, Scope

from .helpers import WAIT, WorkerProcess, eventually

APP = "tests.apps.workers:setup"


async def make_tables(db: asyncpg.Connection[asyncpg.Record]) -> None:
    await db.execute("CREATE TABLE work (run_id uuid, step text, pid int, UNIQUE (run_id, step))")
    await db.execute("CREATE TABLE arrivals (pid int)")


async def test_two_worker_processes_share_the_load_each_step_once(
    dsn: str,
    schema: str,
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
) -> None:
    await make_tables(db)
    hierarchies = 30
    async with (
        WorkerProcess(dsn, schema, APP, BARRIER="1") as one,
        WorkerProcess(dsn, schema, APP, BARRIER="1") as two,
        make_coop(worker=False) as coop,
    ):
        handles = [await coop.launch("work", {"n": n}) for n in range(hierarchies)]
        outcomes = [await handle.wait(timeout=WAIT) for handle in handles]
        events = [event for handle in handles for event in await coop.events(handle.id)]

    assert [o.status for o in outcomes] == ["committed"] * hierarchies
    rows = await db.fetch("SELECT run_id, step, pid FROM work")
    assert len(rows) == 2 * hierarchies  # the UNIQUE constraint rules out a second commit
    by_pid = Counter(row["pid"] for row in rows)
    assert set(by_pid) == {one.pid, two.pid}, by_pid  # both processes did work
    suspended = Counter((e.run_id, e.step) for e in events if e.type == "SUSPENDED")
    assert set(suspended.values()) == {1}
    assert len(suspended) == 2 * hierarchies
    assert Counter(e.type for e in events)["COMMITTED"] == hierarchies
    assert len({e.worker for e in events if e.type == "SUSPENDED"}) == 2


async def test_a_worker_killed_mid_step_loses_nothing(
    dsn: str,
    schema: str,
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
) -> None:
    await make_tables(db)
    inside = anyio.Event()
    await db.add_listener(f"{schema}_hang", lambda *_: inside.set())
    async with make_coop(worker=False) as coop:
        async with WorkerProcess(dsn, schema, APP, HANG_IN="second") as doomed:
            handle = await coop.launch("work", {})
            with anyio.fail_after(WAIT):
                await inside.wait()
            await doomed.kill()
        async with WorkerProcess(dsn, schema, APP) as survivor:
            outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "committed", outcome.failure
    rows = {row["step"]: row["pid"] for row in await db.fetch("SELECT step, pid FROM work")}
    # The killed worker's write in `second` died with its transaction; the survivor redid it.
    assert rows == {"first": doomed.pid, "second": survivor.pid}
    steps = [(e.type, e.step) for e in events if e.saga == "work"]
    assert steps == [
        ("SEEN", None),
        ("SUSPENDED", "first"),
        ("SUSPENDED", "second"),
        ("COMMITTED", "second"),
    ]


async def test_a_subscription_made_after_start_reaches_other_processes(
    make_coop: Callable[..., Cooperation], db: asyncpg.Connection[asyncpg.Record]
) -> None:
    """A worker that subscribes after it started (and never launches) is in the registry
    at once, so another service's launch starts its saga instead of finding no listener."""
    ran: list[int] = []
    saga = Saga("late-joiner")

    @saga.step()
    async def handle(scope: Scope, message: Message[Any]) -> None:
        ran.append(message.payload["n"])

    async with make_coop() as worker, make_coop(worker=False) as client:
        worker.subscribe("joins", saga)

        async def registered() -> bool:
            return bool(
                await db.fetchval("SELECT count(*) FROM subscription WHERE topic = 'joins'")
            )

        await eventually(registered)
        outcome = await (await client.launch("joins", {"n": 1})).wait(timeout=WAIT)

    assert outcome.status == "committed"
    assert ran == [1]


async def test_a_run_that_becomes_ready_while_every_slot_is_busy_starts_when_one_frees(
    make_coop: Callable[..., Cooperation],
) -> None:
    """With `instances=1`, a run launched during another's step is claimed as soon as that
    step ends — not at the next poll (set far beyond the test's timeout)."""
    started = anyio.Event()
    release = anyio.Event()
    saga = Saga("single", instances=1)

    @saga.step()
    async def work(scope: Scope, message: Message[Any]) -> None:
        if message.payload == "first":
            started.set()
            await release.wait()

    async with make_coop(poll_interval=3 * WAIT) as coop:
        coop.subscribe("jobs", saga)
        first = await coop.launch("jobs", "first")
        await started.wait()
        second = await coop.launch("jobs", "second")  # its wake-up arrives while full
        release.set()
        assert (await first.wait(timeout=WAIT)).status == "committed"
        assert (await second.wait(timeout=WAIT)).status == "committed"


async def test_a_run_whose_message_was_deleted_by_hand_does_not_hold_up_its_saga(
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
) -> None:
    """The oldest ready run's message is gone: that run is deferred, later runs go on."""
    done: list[int] = []
    saga = Saga("orphaned")

    @saga.step()
    async def step(scope: Scope, message: Message[Any]) -> None:
        done.append(message.payload)

    async with make_coop() as coop:
        coop.subscribe("orphans", saga)
        await coop.pause(saga)
        broken = await coop.launch("orphans", 0)
        await db.execute("DELETE FROM message WHERE id = $1", broken.id)
        later = await coop.launch("orphans", 1)
        await coop.resume(saga)
        outcome = await later.wait(timeout=WAIT)
        runs = await coop.runs(broken.id)

    assert outcome.status == "committed"
    assert done == [1]
    assert [run.status for run in runs] == ["pending"]  # deferred, not lost
