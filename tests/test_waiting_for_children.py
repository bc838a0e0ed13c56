"""A parent waiting for its children: a time window leaves a late one behind; unsubscribing,
cancellation and deadlines free a parent waiting for a child that never starts; a started
child whose workers are gone is waited for, not dropped.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

import anyio
import asyncpg

from scoopy import HAPPY_PATH_DEADLINE, Message, Saga, Scope, TimeWindow, deadline

from .apps.hierarchies import parent_is_waiting, waiting_parent
from .apps.steps import add_step
from .helpers import WAIT, MakeCoop, both_modes, eventually
from .reading import failure_types, find, has, of_saga

# -- time window --------------------------------------------------------------------------


class LeftBehind(Exception):
    pass


@both_modes
async def test_a_time_window_leaves_a_late_subscriber_behind(
    make_coop: MakeCoop, listen: bool
) -> None:
    """With `TimeWindow(0.3)` the parent waits for children that started within the window
    (even if they finish later) but not for one that had not started when it closed: that
    one is detached and, once resumed, runs and fails in a hierarchy of its own."""
    at: dict[str, datetime] = {}
    straggler_status_at_departure: list[str] = []
    train = Saga("train", strategy=TimeWindow(0.3))

    @train.step()
    async def board(scope: Scope, message: Message[Any]) -> None:
        at["board"] = scope.now()
        await scope.launch("platform", {})

    @train.step()
    async def depart(scope: Scope, message: Message[Any]) -> None:
        at["depart"] = scope.now()
        straggler_status_at_departure.append(
            await scope.connection.fetchval(
                f'SELECT status FROM "{schema}".run WHERE saga = $1', "straggler"
            )
        )

    punctual = Saga("punctual")

    add_step(punctual, "aboard", sleeps=0.5)  # started in time, finishes after the window closed

    @punctual.step()
    async def arrive(scope: Scope, message: Message[Any]) -> None:
        at["arrive"] = scope.now()

    straggler = Saga("straggler")

    @straggler.step()
    async def run_late(scope: Scope, message: Message[Any]) -> None:
        at["straggler"] = scope.now()
        raise LeftBehind("missed the train")

    async with make_coop(listen=listen) as coop:
        schema = coop.schema
        coop.subscribe("departures", train)
        coop.subscribe("platform", punctual)
        coop.subscribe("platform", straggler)
        await coop.pause(straggler)  # it cannot start before the window closes
        handle = await coop.launch("departures", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)
        hierarchy = {run.saga for run in await coop.runs(handle.id)}
        platform = next(e.message_id for e in events if e.type == "EMITTED" and e.saga == "train")
        assert platform is not None
        async with coop.pool.acquire() as conn:
            row = await conn.fetchrow(
                f"""SELECT status, parent_id, root_id, lineage, updated_at
                      FROM "{schema}".run WHERE saga = 'straggler'"""
            )
        await coop.resume(straggler)
        late = await coop.handle(platform).wait(timeout=WAIT)
        late_events = await coop.events(platform)
        after = await coop.outcome(handle.id)

    assert outcome.status == "committed", outcome.failure
    assert at["depart"] - at["board"] >= timedelta(seconds=0.5)  # waited for punctual
    assert at["arrive"] <= at["depart"]
    assert straggler_status_at_departure == ["pending"]
    # Detached when the window closed: outside the parent's hierarchy, rooted at its message.
    assert hierarchy == {"train", "punctual"}
    assert row is not None and row["status"] == "pending" and row["parent_id"] is None
    assert row["root_id"] == platform and row["lineage"][0] == platform
    assert row["updated_at"] - at["board"] >= timedelta(seconds=0.3)
    # Resumed, it runs after the parent finished; its failure reaches nobody.
    assert at["straggler"] > at["depart"]
    assert late.status == "rolled_back"
    assert late.failure is not None and late.failure.message == "missed the train"
    assert after is not None and after.status == "committed" and after.failure is None
    assert not any(e.saga == "straggler" for e in events)
    assert of_saga(late_events, "straggler")[0] == ("SEEN", None)
    assert of_saga(late_events, "straggler")[-1][0] == "ROLLED_BACK"


# -- topology changes, cancellation and deadlines while waiting ---------------------------


@both_modes
async def test_unsubscribing_releases_a_parent_waiting_for_an_unstarted_child(
    make_coop: MakeCoop, listen: bool
) -> None:
    """A parent waits for a child run that has not started; unsubscribing that saga (and
    `sync`) skips the run, the parent commits, and later messages no longer start it."""
    parent, ship, absent, ran = waiting_parent()
    async with make_coop(listen=listen) as coop:
        coop.subscribe("orders", parent)
        coop.subscribe("placed", ship)
        coop.subscribe("placed", absent)
        coop.subscribe("direct", absent)
        await coop.pause(absent)
        handle = await coop.launch("orders", {})
        await parent_is_waiting(coop, handle.id)
        assert "complete" not in ran

        coop.unsubscribe("placed", absent)
        await coop.sync()
        outcome = await handle.wait(timeout=WAIT)
        again = await (await coop.launch("orders", {})).wait(timeout=WAIT)
        await coop.resume(absent)
        # The saga works again, on the topic it still listens to; the skipped run stays skipped.
        direct = await (await coop.launch("direct", {})).wait(timeout=WAIT)
        runs = await coop.runs(handle.id) + await coop.runs(again.id)

    assert outcome.status == "committed", outcome.failure
    assert again.status == "committed" and direct.status == "committed"
    assert [run.status for run in runs if run.saga == "absent"] == ["skipped"]
    assert ran.count("absent:placed") == 0 and ran.count("absent:direct") == 1
    assert ran.count("complete") == 2


async def test_unsubscribing_while_a_step_emits_to_that_saga_still_releases_the_parent(
    make_coop: MakeCoop, db: asyncpg.Connection[asyncpg.Record]
) -> None:
    """The step's emission has created a run of the saga being unsubscribed but not yet
    committed: the unsubscribe waits for that step and skips the run, so the parent is not
    left waiting for a run that will never start."""
    await db.execute("CREATE TABLE gate (n int)")
    await db.execute(
        """CREATE FUNCTION hold_commit() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NULL; END $$"""
    )
    await db.execute(
        """CREATE CONSTRAINT TRIGGER hold AFTER INSERT ON gate DEFERRABLE INITIALLY DEFERRED
           FOR EACH ROW EXECUTE FUNCTION hold_commit()"""
    )
    _, _, absent, ran = waiting_parent()
    gated = Saga("gated")

    @gated.step()
    async def place(scope: Scope, message: Message[Any]) -> None:
        await scope.connection.execute(f'INSERT INTO "{schema}".gate VALUES (1)')
        await scope.launch("placed", {})  # emitted; the commit then waits for the gate

    add_step(gated, "complete", ran, does="complete")

    async def waiting(query: str) -> bool:
        return bool(
            await db.fetchval(
                """SELECT count(*) FROM pg_stat_activity
                    WHERE wait_event_type = 'Lock' AND query LIKE $1""",
                query,
            )
        )

    async with make_coop() as coop, anyio.create_task_group() as tg:
        schema = coop.schema
        coop.subscribe("orders", gated)
        coop.subscribe("placed", absent)
        await coop.pause(absent)
        await db.execute("SELECT pg_advisory_lock(4242)")
        handle = await coop.launch("orders", {})
        await eventually(lambda: waiting("%COMMIT%"))  # the step's transaction is at its commit
        synced = anyio.Event()

        async def unsubscribe() -> None:
            coop.unsubscribe("placed", absent)
            await coop.sync()
            synced.set()

        tg.start_soon(unsubscribe)

        async def unsubscribing() -> bool:
            return synced.is_set() or await waiting("%scoopy.registry%")

        await eventually(unsubscribing)
        await db.execute("SELECT pg_advisory_unlock(4242)")
        outcome = await handle.wait(timeout=WAIT)
        runs = await coop.runs(handle.id)

    assert outcome.status == "committed", outcome.failure
    assert ran == ["complete"]
    assert [run.status for run in runs if run.saga == "absent"] == ["skipped"]


@both_modes
async def test_a_parent_waiting_for_a_child_that_never_starts_can_be_cancelled(
    make_coop: MakeCoop, listen: bool
) -> None:
    """Cancellation frees a parent stuck waiting for a child that never starts: the child
    run is skipped and the parent rolls back (compensating what it committed)."""
    parent, ship, absent, ran = waiting_parent()
    async with make_coop(listen=listen) as coop:
        coop.subscribe("orders", parent)
        coop.subscribe("placed", ship)
        coop.subscribe("placed", absent)
        await coop.pause(absent)
        handle = await coop.launch("orders", {})
        await parent_is_waiting(coop, handle.id)
        assert await coop.cancel(handle.id, "operator gave up")
        outcome = await handle.wait(timeout=WAIT)
        runs = await coop.runs(handle.id)

    assert outcome.status == "rolled_back"
    types = failure_types(outcome.failure)
    assert types[0] == "scoopy.GaveUp" and "scoopy.CancellationRequested" in types
    assert find(outcome.failure, "scoopy.CancellationRequested").message == "operator gave up"
    assert {run.saga: run.status for run in runs} == {
        "waiter": "rolled_back",
        "ship": "rolled_back",
        "absent": "skipped",
    }
    assert ran == ["place", "ship", "unplace"]


@both_modes
async def test_a_parent_waiting_for_a_child_that_never_starts_misses_its_deadline(
    make_coop: MakeCoop, listen: bool
) -> None:
    """A happy-path deadline frees a parent waiting for a child that never starts: it gives
    up at the deadline (not before, not never) and rolls back."""
    parent, ship, absent, ran = waiting_parent()
    async with make_coop(listen=listen) as coop:
        coop.subscribe("orders", parent)
        coop.subscribe("placed", ship)
        coop.subscribe("placed", absent)
        await coop.pause(absent)
        started = time.monotonic()
        limit = deadline(0.3, "x")
        handle = await coop.launch("orders", {}, context={HAPPY_PATH_DEADLINE: limit})
        outcome = await handle.wait(timeout=WAIT)
        elapsed = time.monotonic() - started
        events = await coop.events(handle.id)

    assert outcome.status == "rolled_back"
    assert 0.3 <= elapsed < WAIT / 2
    types = failure_types(outcome.failure)
    assert types[0] == "scoopy.GaveUp" and "scoopy.DeadlineMissed" in types
    missed = find(outcome.failure, "scoopy.DeadlineMissed")
    assert missed.message.startswith("Missed happy path deadline of x at ")
    gave_up = next(e for e in events if e.saga == "waiter" and e.type == "ROLLING_BACK")
    assert gave_up.time >= limit.at
    assert "complete" not in ran


@both_modes
async def test_a_started_child_whose_saga_lost_its_workers_is_rolled_back_when_one_returns(
    make_coop: MakeCoop, listen: bool
) -> None:
    """A child that committed a step and then lost every worker serving its saga cannot be
    rolled back without that saga's compensations: a cancelled parent waits for it (nothing
    is dropped), and a worker serving the saga again finishes the rollback."""
    ran: list[str] = []
    parent, _, _, _ = waiting_parent()
    slow = Saga("slow")

    add_step(slow, "begin", ran, does="begin", sleeps=3600, undo="unbegin")
    add_step(slow, "end", ran, does="end")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("orders", parent)
        async with make_coop(listen=listen) as service:
            service.subscribe("placed", slow)
            await service.sync()
            handle = await coop.launch("orders", {})

            async def sleeping() -> bool:
                return has(await coop.events(handle.id), "SUSPENDED", "slow", "begin")

            await eventually(sleeping)
        # The only worker serving "slow" is gone, mid-run.
        assert await coop.cancel(handle.id, "give up")
        runs = {run.saga: run.status for run in await coop.runs(handle.id)}
        assert runs == {"waiter": "active", "slow": "active"}  # waiting, not dropped
        async with make_coop(listen=listen) as service:
            service.subscribe("placed", slow)
            outcome = await handle.wait(timeout=WAIT)
        runs = {run.saga: run.status for run in await coop.runs(handle.id)}

    assert outcome.status == "rolled_back"
    assert runs == {"waiter": "rolled_back", "slow": "rolled_back"}
    assert ran == ["begin", "unbegin"]
