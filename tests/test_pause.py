"""Pause and resume: a paused saga starts no run and takes no step until resumed, also when
the pause comes from another process.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import anyio
import asyncpg

from scoopy import Message, Saga, Scope

from .apps.steps import add_step
from .helpers import WAIT, MakeCoop, both_modes, db_now, eventually
from .reading import has


@both_modes
async def test_a_paused_saga_does_not_start_until_resumed(
    make_coop: MakeCoop,
    db: asyncpg.Connection[asyncpg.Record],
    listen: bool,
) -> None:
    """A paused saga's new run is not started while a sibling on the same message finishes;
    it starts only after `resume`."""
    at: dict[str, datetime] = {}
    held = Saga("held")

    @held.step()
    async def hold(scope: Scope, message: Message[Any]) -> None:
        at["held"] = scope.now()

    canary = Saga("canary")

    @canary.step()
    async def sing(scope: Scope, message: Message[Any]) -> None:
        at["canary"] = scope.now()

    async with make_coop(listen=listen) as coop:
        coop.subscribe("pausable", held)
        coop.subscribe("pausable", canary)
        await coop.pause(held, reason="deploying")
        assert await coop.paused() == ["held"]
        handle = await coop.launch("pausable", {})

        async def canary_done() -> bool:
            return has(await coop.events(handle.id), "COMMITTED", "canary")

        await eventually(canary_done)  # the same launch woke both sagas' workers
        assert "held" not in at
        events = await coop.events(handle.id)
        assert not any(e.saga == "held" for e in events)
        resumed = await db_now(db)
        await coop.resume(held)
        assert await coop.paused() == []
        outcome = await handle.wait(timeout=WAIT)

    assert outcome.status == "committed", outcome.failure
    assert at["held"] >= resumed > at["canary"]


@both_modes
async def test_pausing_holds_a_run_between_steps(
    make_coop: MakeCoop,
    db: asyncpg.Connection[asyncpg.Record],
    listen: bool,
) -> None:
    """A run whose saga is paused while it sleeps does not take its next step when the sleep
    is over, only after `resume`."""
    at: dict[str, datetime] = {}
    first_done = anyio.Event()
    stepper = Saga("stepper")

    @stepper.step()
    async def one(scope: Scope, message: Message[Any]) -> None:
        at["one"] = scope.now()
        await scope.sleep(0.2)
        first_done.set()

    @stepper.step()
    async def two(scope: Scope, message: Message[Any]) -> None:
        at["two"] = scope.now()

    async with make_coop(listen=listen) as coop:
        coop.subscribe("stepping", stepper)
        handle = await coop.launch("stepping", {})
        with anyio.fail_after(WAIT):
            await first_done.wait()
        await coop.pause(stepper)
        due = at["one"] + timedelta(seconds=0.2)

        async def well_past_due() -> bool:
            return await db_now(db) > due + timedelta(seconds=0.2)

        await eventually(well_past_due)  # the clock is what is under test here
        assert "two" not in at
        resumed = await db_now(db)
        await coop.resume(stepper)
        outcome = await handle.wait(timeout=WAIT)

    assert outcome.status == "committed", outcome.failure
    assert at["two"] >= resumed


async def test_a_paused_parent_is_not_finished_by_its_last_childs_transaction(
    make_coop: MakeCoop,
    db: asyncpg.Connection[asyncpg.Record],
) -> None:
    """A child finishing while its parent's saga is paused leaves the parent waiting: the
    parent commits only after `resume`, not as bookkeeping in the child's transaction."""
    started, release = anyio.Event(), anyio.Event()
    parent = Saga("paused-parent")

    add_step(parent, "spawn", launches="slow-kid")

    kid = Saga("slow-kid")

    @kid.step()
    async def work(scope: Scope, message: Message[Any]) -> None:
        started.set()
        await release.wait()

    async with make_coop() as coop:
        coop.subscribe("paused-parents", parent)
        coop.subscribe("slow-kid", kid)
        handle = await coop.launch("paused-parents", {})
        with anyio.fail_after(WAIT):
            await started.wait()
        await coop.pause(parent)
        release.set()

        async def kid_done() -> bool:
            return has(await coop.events(handle.id), "COMMITTED", "slow-kid")

        await eventually(kid_done)
        assert not has(await coop.events(handle.id), "COMMITTED", "paused-parent")
        resumed = await db_now(db)
        await coop.resume(parent)
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "committed", outcome.failure
    done = [e for e in events if e.type == "COMMITTED" and e.saga == "paused-parent"]
    assert len(done) == 1 and done[0].time >= resumed


async def test_pause_and_resume_from_another_process_reach_the_worker(
    make_coop: MakeCoop,
    db: asyncpg.Connection[asyncpg.Record],
) -> None:
    """An operator's `pause` holds a worker's runs; its `resume` (no worker of its own, so no
    local wake-up) is noticed by the worker's poll and the run starts only then."""
    at: dict[str, datetime] = {}
    held = Saga("held")

    @held.step()
    async def hold(scope: Scope, message: Message[Any]) -> None:
        at["held"] = scope.now()

    async with (
        make_coop() as worker,
        make_coop(worker=False) as operator,
    ):
        worker.subscribe("pausable", held)
        await worker.sync()
        await operator.pause("held")
        handle = await operator.launch("pausable", {})  # its NOTIFY wakes the worker in vain
        resumed = await db_now(db)
        await operator.resume("held")
        outcome = await handle.wait(timeout=WAIT)

    assert outcome.status == "committed", outcome.failure
    assert at["held"] >= resumed
