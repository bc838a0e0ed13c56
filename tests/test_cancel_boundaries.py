"""Issue 12, "cancellation is never lost": a cancellation that arrives while a step runs is
honoured at that step's boundary (seed 003; scoop-semantics.md §8.4).

Cancellation is checked before and after every step; a step cancelled while it ran has its
transaction discarded (its business writes and the messages it emitted are gone), the run
rolls back from the steps before it, and the parent hears of it. (The check after the step
used to read the cancellation state of the claim, so the step committed: on a middle step
its writes and children survived, on a last step the run committed although `coop.cancel`
returned True, and a parent's `on_child_failure` was never called.)
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, TypeAlias

import anyio
import asyncpg
import pytest

from scoopy import Cooperation, CooperationError, Message, NextStep, Saga, Scope

from .apps.steps import logged
from .helpers import WAIT
from .reading import of_saga

MakeCoop = Callable[..., Cooperation]
Db: TypeAlias = "asyncpg.Connection[asyncpg.Record]"


class Gate:
    """A step blocks in `inside()` until the test `release()`s it; the test waits for it."""

    def __init__(self) -> None:
        self.entered = anyio.Event()
        self.released = anyio.Event()

    async def inside(self) -> None:
        self.entered.set()
        await self.released.wait()

    async def reached(self) -> None:
        with anyio.fail_after(WAIT):
            await self.entered.wait()

    def release(self) -> None:
        self.released.set()


async def write(scope: Scope, schema: str, what: str) -> None:
    """A business write through the step's own transaction."""
    await scope.connection.execute(f'INSERT INTO "{schema}".effect VALUES ($1)', what)


async def effects(db: Db) -> list[str]:
    return [row["what"] for row in await db.fetch("SELECT what FROM effect ORDER BY what")]


@pytest.fixture
async def table(db: Db) -> None:
    await db.execute("CREATE TABLE effect (what text)")


@pytest.mark.usefixtures("table")
async def test_a_cancellation_during_a_middle_step_discards_that_step(
    make_coop: MakeCoop, db: Db, schema: str
) -> None:
    log: list[str] = []
    gate = Gate()
    report = Saga("report")
    logged(report, "gather", log)

    @report.step()
    async def crunch(scope: Scope, message: Message[Any]) -> None:
        await write(scope, schema, "crunched")
        await scope.launch("side-job", {})
        await gate.inside()

    @crunch.rollback
    async def uncrunch(scope: Scope, message: Message[Any], failure: BaseException) -> None:
        log.append("never: crunch did not commit")

    logged(report, "publish", log)
    side = Saga("side-job")
    logged(side, "never started", log)

    async with make_coop() as coop:
        coop.subscribe("report", report)
        coop.subscribe("side-job", side)
        handle = await coop.launch("report", {})
        await gate.reached()
        assert await coop.cancel(handle.id, "stop the report")
        gate.release()
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "rolled_back"
    assert outcome.failure is not None and outcome.failure.message == "Gave up: stop the report"
    assert await effects(db) == []  # the cancelled step's write was discarded
    assert log == ["gather", "ungather"]  # its message too: the side job never ran
    assert [run.saga for run in outcome.runs] == ["report"]
    assert of_saga(events, "report") == [
        ("SEEN", None),
        ("SUSPENDED", "gather"),
        ("ROLLING_BACK", "crunch"),
        ("SUSPENDED", "Rollback of gather (rolling back child scopes)"),
        ("SUSPENDED", "Rollback of gather"),
        ("ROLLED_BACK", "Rollback of gather"),
    ]


@pytest.mark.usefixtures("table")
async def test_a_cancellation_during_the_last_step_rolls_the_run_back(
    make_coop: MakeCoop, db: Db, schema: str
) -> None:
    """The reproduction of issue 12: a one-step saga cancelled while its step waits."""
    log: list[str] = []
    gate = Gate()
    job = Saga("job")

    @job.step()
    async def only(scope: Scope, message: Message[Any]) -> None:
        await write(scope, schema, "done")
        await gate.inside()

    @only.rollback
    async def unonly(scope: Scope, message: Message[Any], failure: BaseException) -> None:
        log.append("never: the step did not commit")

    async with make_coop() as coop:
        coop.subscribe("job", job)
        handle = await coop.launch("job", {})
        await gate.reached()
        assert await coop.cancel(handle.id, "not needed")
        gate.release()
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "rolled_back"
    assert await effects(db) == []
    assert log == []
    assert [t for t, _ in of_saga(events, "job")] == ["SEEN", "ROLLING_BACK", "ROLLED_BACK"]


@pytest.mark.usefixtures("table")
async def test_a_cancelled_sub_tree_reaches_the_parent_that_handles_it(
    make_coop: MakeCoop, db: Db, schema: str
) -> None:
    """Cancel one child run while its (last) step runs: the child rolls back, the parent's
    `on_child_failure` hears of the cancellation, handles it and the parent commits."""
    handled: list[list[str]] = []
    child_runs: list[uuid.UUID] = []
    gate = Gate()
    parent = Saga("parent")

    @parent.step()
    async def delegate(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("child", {})

    @delegate.on_child_failure
    async def tolerate(
        scope: Scope, message: Message[Any], failure: CooperationError
    ) -> NextStep | None:
        handled.append([each.type for each in failure.failure.walk()])
        return None

    @parent.step()
    async def carry_on(scope: Scope, message: Message[Any]) -> None:
        await write(scope, schema, "parent carried on")

    child = Saga("child")

    @child.step()
    async def work(scope: Scope, message: Message[Any]) -> None:
        child_runs.append(scope.run_id)
        await write(scope, schema, "child worked")
        await gate.inside()

    async with make_coop() as coop:
        coop.subscribe("parent", parent)
        coop.subscribe("child", child)
        handle = await coop.launch("parent", {})
        await gate.reached()
        assert await coop.cancel(child_runs[0], "the child is not needed")
        gate.release()
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "committed", outcome.failure
    assert await effects(db) == ["parent carried on"]
    assert len(handled) == 1 and "scoopy.CancellationRequested" in handled[0]
    assert [t for t, _ in of_saga(events, "child")] == ["SEEN", "ROLLING_BACK", "ROLLED_BACK"]
    assert {run.saga: run.status for run in outcome.runs} == {"parent": "committed"}
