"""Steps are transactions: business writes, messages and bookkeeping commit or vanish together."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from scoopy import ChildRolledBack, Cooperation, Message, Saga, Scope

from .helpers import WAIT, both_modes, run_to_end
from .reading import triples


class Boom(Exception):
    pass


@both_modes
async def test_a_step_that_raises_after_launching_leaves_nothing(
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
    listen: bool,
) -> None:
    await db.execute("CREATE TABLE reservation (order_id int PRIMARY KEY)")
    child_ran: list[str] = []
    saga = Saga("reserver")

    @saga.step()
    async def reserve(scope: Scope, message: Message[Any]) -> None:
        await scope.connection.execute(
            f'INSERT INTO "{scope_schema}".reservation VALUES ($1)', message.payload["order"]
        )
        await scope.launch("payments", {"order": message.payload["order"]})
        raise Boom("card declined")

    child = Saga("payment")

    @child.step()
    async def pay(scope: Scope, message: Message[Any]) -> None:
        child_ran.append("pay")

    async with make_coop(listen=listen) as coop:
        scope_schema = coop.schema
        coop.subscribe("orders", saga)
        coop.subscribe("payments", child)
        handle = await coop.launch("orders", {"order": 7})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "rolled_back"
    assert outcome.failure is not None
    assert outcome.failure.type == f"{Boom.__module__}.Boom"
    assert outcome.failure.message == "card declined"
    assert outcome.failure.source.startswith("reserver[")
    assert any(frame.function == "reserve" for frame in outcome.failure.stack_trace)
    assert await db.fetchval("SELECT count(*) FROM reservation") == 0
    assert await db.fetchval("SELECT count(*) FROM message WHERE topic = 'payments'") == 0
    assert await db.fetchval("SELECT count(*) FROM run WHERE saga = 'payment'") == 0
    assert child_ran == []
    assert triples(events) == [
        ("EMITTED", None, None),
        ("SEEN", "reserver", None),
        ("ROLLING_BACK", "reserver", "reserve"),
        ("ROLLED_BACK", "reserver", "Rollback of reserve"),
    ]


@both_modes
async def test_business_writes_commit_with_the_step(
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
    listen: bool,
) -> None:
    await db.execute("CREATE TABLE ledger (step text, run uuid)")
    saga = Saga("writer")

    @saga.step()
    async def one(scope: Scope, message: Message[Any]) -> None:
        await scope.connection.execute(
            f'INSERT INTO "{scope_schema}".ledger VALUES ($1, $2)', scope.step, scope.run_id
        )

    @saga.step()
    async def two(scope: Scope, message: Message[Any]) -> None:
        await scope.connection.execute(
            f'INSERT INTO "{scope_schema}".ledger VALUES ($1, $2)', scope.step, scope.run_id
        )
        raise Boom("after writing")

    async with make_coop(listen=listen) as coop:
        scope_schema = coop.schema
        coop.subscribe("write", saga)
        outcome = await (await coop.launch("write", {})).wait(timeout=WAIT)

    assert outcome.status == "rolled_back"
    # Step one committed (and had no compensation), step two's write vanished with it.
    assert [r["step"] for r in await db.fetch("SELECT step FROM ledger")] == ["one"]


@both_modes
async def test_a_failed_sql_statement_fails_the_step_not_the_worker(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    """A step whose SQL errors leaves its transaction aborted; scoopy still records the failure."""
    saga = Saga("bad-sql")

    @saga.step()
    async def broken(scope: Scope, message: Message[Any]) -> None:
        # Swallowed, but the transaction is now aborted.
        with contextlib.suppress(asyncpg.UndefinedTableError):
            await scope.connection.execute("SELECT * FROM no_such_table")

    _, outcome, _ = await run_to_end(make_coop(listen=listen), [("bad", saga)], "bad")

    assert outcome.status == "rolled_back"
    assert outcome.failure is not None
    assert "InFailedSQLTransaction" in outcome.failure.type


@both_modes
async def test_failure_of_a_child_reaches_the_parent_as_a_distributed_exception(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    parent = Saga("parent")

    @parent.step("First parent step")
    async def first(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("child", {})

    child = Saga("child")

    @child.step("First child step")
    async def child_first(scope: Scope, message: Message[Any]) -> None:
        raise Boom("My exception message")

    _, outcome, _ = await run_to_end(
        make_coop(listen=listen), [("parent", parent), ("child", child)], "parent"
    )

    assert outcome.status == "rolled_back"
    failure = outcome.failure
    assert failure is not None
    assert failure.type == "scoopy.ChildRolledBack"
    assert failure.message == "Child failure occurred while suspended in step [First parent step]"
    assert failure.source.startswith("parent[")
    [cause] = failure.causes
    assert cause.message == "My exception message"
    assert cause.source.startswith("child[")
    error = failure.to_exception()
    assert isinstance(error, ChildRolledBack)
    rendered = str(error)
    assert "Child failure occurred while suspended in step [First parent step]" in rendered
    assert "My exception message" in rendered
    assert "child_first" in rendered


@both_modes
async def test_steps_can_nest_their_own_transaction_blocks(
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
    listen: bool,
) -> None:
    """Business code that uses `connection.transaction()` gets savepoints in the step's."""
    await db.execute("CREATE TABLE note (text text)")
    saga = Saga("nesting")

    @saga.step()
    async def write(scope: Scope, message: Message[Any]) -> None:
        table = f'"{scope_schema}".note'
        async with scope.connection.transaction():
            await scope.connection.execute(f"INSERT INTO {table} VALUES ('kept')")
        with contextlib.suppress(Boom):
            async with scope.connection.transaction():
                await scope.connection.execute(f"INSERT INTO {table} VALUES ('undone')")
                raise Boom("inner block fails")

    async with make_coop(listen=listen) as coop:
        scope_schema = coop.schema
        coop.subscribe("nesting", saga)
        assert (await (await coop.launch("nesting", {})).wait(timeout=WAIT)).status == "committed"

    assert [r["text"] for r in await db.fetch("SELECT text FROM note")] == ["kept"]


async def test_session_state_a_step_sets_does_not_leak(
    make_coop: Callable[..., Cooperation],
) -> None:
    """A connection a step used is reset before scoopy (or another step) reuses it."""
    seen: list[str] = []
    saga = Saga("session", instances=1)

    @saga.step()
    async def look(scope: Scope, message: Message[Any]) -> None:
        seen.append(await scope.connection.fetchval("SHOW application_name"))
        await scope.connection.execute("SET application_name = 'changed by a step'")

    async with make_coop(pool_size=2) as coop:
        coop.subscribe("session", saga)
        for _ in range(4):
            await (await coop.launch("session", {})).wait(timeout=WAIT)

    assert seen == ["scoopy"] * 4


@both_modes
async def test_a_constraint_broken_at_commit_fails_the_step(
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
    listen: bool,
) -> None:
    """A deferred constraint fails only at COMMIT, after the step returned: the step counts as
    failed (once, not retried forever) and the run rolls back with that error."""
    await db.execute(
        "CREATE TABLE seat (no int, CONSTRAINT one_per_seat UNIQUE (no) "
        "DEFERRABLE INITIALLY DEFERRED)"
    )
    ran: list[str] = []
    saga = Saga("booker")

    @saga.step()
    async def book(scope: Scope, message: Message[Any]) -> None:
        ran.append("book")
        await scope.connection.execute(
            f'INSERT INTO "{scope_schema}".seat VALUES (1), (1)'  # fine until COMMIT
        )

    async with make_coop(listen=listen) as coop:
        scope_schema = coop.schema
        coop.subscribe("bookings", saga)
        outcome = await (await coop.launch("bookings", {})).wait(timeout=WAIT)

    assert outcome.status == "rolled_back"
    assert outcome.failure is not None and "UniqueViolation" in outcome.failure.type
    assert ran == ["book"]
    assert await db.fetchval("SELECT count(*) FROM seat") == 0


async def test_an_error_message_with_a_nul_character_is_still_recorded(
    make_coop: Callable[..., Cooperation],
) -> None:
    """PostgreSQL cannot store NUL in JSON; the failure is recorded with it escaped."""
    saga = Saga("nul")

    @saga.step()
    async def step(scope: Scope, message: Message[Any]) -> None:
        raise Boom("bad\x00byte")

    _, outcome, _ = await run_to_end(make_coop(), [("nul", saga)], "nul")

    assert outcome.status == "rolled_back"
    assert outcome.failure is not None and outcome.failure.message == "bad\\x00byte"


@both_modes
@pytest.mark.parametrize("touched", [False, True], ids=["untouched", "touched"])
async def test_a_failing_step_context_changes_reach_its_rollback_either_way(
    make_coop: Callable[..., Cooperation], listen: bool, touched: bool
) -> None:
    """What a failing step set in the context is seen by the compensations, whether or not the
    step wrote through its connection (which makes the transaction redo without it)."""
    seen: list[Any] = []
    saga = Saga("marker")

    @saga.step()
    async def first(scope: Scope, message: Message[Any]) -> None:
        pass

    @first.rollback
    async def undo_first(scope: Scope, message: Message[Any], failure: BaseException) -> None:
        seen.append(scope.context.get("marker"))

    @saga.step()
    async def second(scope: Scope, message: Message[Any]) -> None:
        scope.context["marker"] = "set by the failing step"
        if touched:
            await scope.connection.execute("SELECT 1")
        raise Boom("no")

    _, outcome, _ = await run_to_end(make_coop(listen=listen), [("marks", saga)], "marks")

    assert outcome.status == "rolled_back"
    assert seen == ["set by the failing step"]
