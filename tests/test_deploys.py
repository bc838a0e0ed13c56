"""Issue 12, safe deploys: worker processes restarted on changed code under suspended runs.

Each test holds an order suspended in `reserve_stock` (its inventory child waits, paused in
this process), stops the worker of release v1, starts one of another release, lets the
child finish, and counts the business rows: no committed step ever runs twice, no step is
skipped silently. Incompatible changes hold the run, visibly, until a declared mapping, a
fitting worker or an operator lets it go on or roll back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import TypeAlias

import asyncpg
import pytest

from scoopy import Cooperation, Outcome, RunHandle

from .apps.deploys import inventory_saga
from .helpers import WAIT, WorkerProcess, eventually

Db: TypeAlias = "asyncpg.Connection[asyncpg.Record]"
APP = "tests.apps.deploys:coop"


class Deploy:
    """The test's view of one schema: its own process serves the inventory saga."""

    def __init__(self, coop: Cooperation, db: Db, dsn: str, schema: str) -> None:
        self.coop = coop
        self.db = db
        self.dsn = dsn
        self.schema = schema
        self.orders = 0

    def worker(self, release: str) -> WorkerProcess:
        return WorkerProcess(self.dsn, self.schema, APP, ORDER_RELEASE=release)

    async def effects(self, order: int) -> Counter[tuple[str, str, str]]:
        rows = await self.db.fetch("SELECT saga, step, kind FROM effect WHERE order_id = $1", order)
        return Counter((row["saga"], row["step"], row["kind"]) for row in rows)

    async def suspended_order(self) -> tuple[int, RunHandle]:
        """An order that committed `reserve_stock` and waits for its (paused) child."""
        self.orders += 1
        order = self.orders
        handle = await self.coop.launch("orders", {"id": order})

        async def suspended() -> bool:
            return (await self.effects(order))[("order", "reserve_stock", "do")] == 1

        await eventually(suspended)
        return order, handle

    async def order_run(self, handle: RunHandle) -> asyncpg.Record:
        row = await self.db.fetchrow(
            "SELECT id, held, status FROM run WHERE root_id = $1 AND saga = 'order'", handle.id
        )
        assert row is not None
        return row

    async def held(self, handle: RunHandle) -> str:
        """Wait until the order is held; its reason."""

        async def is_held() -> bool:
            return (await self.order_run(handle))["held"] is not None

        await eventually(is_held)
        return str((await self.order_run(handle))["held"])


@pytest.fixture
async def deploy(
    make_coop: Callable[..., Cooperation],
    db: Db,
    dsn: str,
    schema: str,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Deploy]:
    monkeypatch.setenv("SCOOPY_TEST_SCHEMA", schema)  # where this process's inventory writes
    await db.execute(
        "CREATE TABLE effect (order_id int, saga text, step text, kind text, "
        "at timestamptz DEFAULT clock_timestamp())"
    )
    async with make_coop(heartbeat=0.2, liveness_timeout=1.5) as coop:
        coop.subscribe("inventory", inventory_saga())
        await coop.pause("inventory")  # orders stay suspended in reserve_stock until resumed
        yield Deploy(coop, db, dsn, schema)


ONCE = {("order", "validate", "do"): 1, ("order", "reserve_stock", "do"): 1}
TAKEN = {("inventory", "take", "do"): 1}


async def redeploy(deploy: Deploy, release: str) -> tuple[int, RunHandle, WorkerProcess]:
    """An order suspended under v1, then the worker of `release` in v1's place."""
    async with deploy.worker("v1"):
        order, handle = await deploy.suspended_order()
    worker = deploy.worker(release)
    return order, handle, worker


@pytest.mark.parametrize(
    ("release", "then"),
    [
        ("append", {("order", "charge", "do"): 1, ("order", "notify", "do"): 1}),
        ("body", {("order", "charge", "do-v2"): 1}),
        ("insert-after", {("order", "fraud_screen", "do"): 1, ("order", "charge", "do"): 1}),
    ],
)
async def test_compatible_changes_apply_to_the_suspended_run(
    deploy: Deploy, release: str, then: dict[tuple[str, str, str], int]
) -> None:
    order, handle, worker = await redeploy(deploy, release)
    async with worker:
        await deploy.coop.resume("inventory")
        outcome = await handle.wait(timeout=WAIT)
    assert outcome.status == "committed", outcome.failure
    assert await deploy.effects(order) == Counter({**ONCE, **TAKEN, **then})


@pytest.mark.parametrize(
    ("release", "names"),
    [
        ("insert", "fraud_screen"),
        ("remove", "reserve_stock"),
        ("rename", "reserve_stock"),
        ("reorder", "reserve_stock"),
    ],
)
async def test_incompatible_changes_hold_the_run_visibly(
    deploy: Deploy, release: str, names: str
) -> None:
    order, handle, worker = await redeploy(deploy, release)
    async with worker:
        await deploy.coop.resume("inventory")
        reason = await deploy.held(handle)
        waiting = await deploy.coop.waiting_for(handle.id)
        events = await deploy.coop.events(handle.id)
        fresh = await deploy.coop.launch("orders", {"id": 100})  # new orders are not held
        assert (await fresh.wait(timeout=WAIT)).status == "committed"
    assert "order" in reason and names in reason, reason
    assert [w.kind for w in waiting] == ["held"] and names in waiting[0].detail
    held = [e for e in events if e.type == "HELD"]
    assert len(held) == 1 and held[0].failure is not None and names in held[0].failure.message
    # Nothing ran twice, nothing after the held position ran.
    assert await deploy.effects(order) == Counter({**ONCE, **TAKEN})


async def test_a_declared_rename_releases_the_held_run(deploy: Deploy) -> None:
    order, handle, worker = await redeploy(deploy, "rename")
    async with worker:
        await deploy.coop.resume("inventory")
        await deploy.held(handle)
    async with deploy.worker("rename-declared"):
        outcome = await handle.wait(timeout=WAIT)
        events = await deploy.coop.events(handle.id)
    assert outcome.status == "committed", outcome.failure
    assert await deploy.effects(order) == Counter({**ONCE, **TAKEN, ("order", "charge", "do"): 1})
    assert [e.type for e in events if e.type in ("HELD", "RELEASED")] == ["HELD", "RELEASED"]


async def test_an_operator_rollback_of_a_held_run_compensates_by_step_name(
    deploy: Deploy,
) -> None:
    order, handle, worker = await redeploy(deploy, "insert")
    async with worker:
        await deploy.coop.resume("inventory")
        run = await deploy.order_run(handle)
        await deploy.held(handle)
        assert await deploy.coop.cancel(run["id"], "the order was cancelled")
        outcome = await handle.wait(timeout=WAIT)
    assert outcome.status == "rolled_back"
    assert await deploy.effects(order) == Counter(
        {
            **ONCE,
            **TAKEN,
            ("inventory", "take", "undo"): 1,
            ("order", "reserve_stock", "undo"): 1,
            ("order", "validate", "undo"): 1,
        }
    )


@pytest.mark.parametrize("to_step", [None, "charge"])
async def test_an_operator_moves_a_held_run_on(deploy: Deploy, to_step: str | None) -> None:
    """The run goes on after the step it reached, found by name; the inserted step, which
    lies before its position, is skipped for this run, as the operator asked."""
    order, handle, worker = await redeploy(deploy, "insert")
    async with worker:
        await deploy.coop.resume("inventory")
        run = await deploy.order_run(handle)
        await deploy.held(handle)
        await deploy.coop.move(run["id"], to_step)
        outcome = await handle.wait(timeout=WAIT)
    assert outcome.status == "committed", outcome.failure
    assert await deploy.effects(order) == Counter({**ONCE, **TAKEN, ("order", "charge", "do"): 1})


async def test_a_move_that_would_run_a_committed_step_again_keeps_the_run_held(
    deploy: Deploy,
) -> None:
    order, handle, worker = await redeploy(deploy, "insert")
    async with worker:
        await deploy.coop.resume("inventory")
        run = await deploy.order_run(handle)
        first = await deploy.held(handle)
        await deploy.coop.move(run["id"], "fraud_screen")  # before reserve_stock, committed

        async def held_again() -> bool:
            reason = (await deploy.order_run(handle))["held"]
            return reason is not None and reason != first

        await eventually(held_again)
        reason = (await deploy.order_run(handle))["held"]
    assert "'reserve_stock' again" in reason, reason
    assert await deploy.effects(order) == Counter({**ONCE, **TAKEN})


async def test_blue_green_old_runs_finish_on_the_old_release_new_ones_start_on_the_new(
    deploy: Deploy,
) -> None:
    async with deploy.worker("v1") as blue:
        old, old_handle = await deploy.suspended_order()
        async with deploy.worker("insert"):
            await blue.wait_for(b"starting no new runs")
            await deploy.coop.resume("inventory")
            new_handle = await deploy.coop.launch("orders", {"id": 100})
            outcomes: list[Outcome] = [
                await old_handle.wait(timeout=WAIT),
                await new_handle.wait(timeout=WAIT),
            ]
    assert [o.status for o in outcomes] == ["committed", "committed"]
    assert await deploy.effects(old) == Counter({**ONCE, **TAKEN, ("order", "charge", "do"): 1})
    assert await deploy.effects(100) == Counter(
        {**ONCE, **TAKEN, ("order", "fraud_screen", "do"): 1, ("order", "charge", "do"): 1}
    )
