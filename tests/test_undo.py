"""Undo (`coop.rollback`): a committed hierarchy, or one run's sub-tree, is compensated in
reverse; a hierarchy that did not commit cannot be undone.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from scoopy import HAPPY_PATH_DEADLINE, Message, Saga, ScoopyError, Scope, deadline

from .apps.hierarchies import is_asleep, undo_target, waiting_hierarchy
from .apps.steps import MyException, add_step
from .helpers import WAIT, MakeCoop, both_modes, eventually, wait_for_event
from .reading import describe, of_saga, run_of


@both_modes
async def test_undo_of_a_committed_hierarchy_runs_every_compensation_in_reverse(
    make_coop: MakeCoop, listen: bool
) -> None:
    """`coop.rollback(root)` undoes three committed levels, children before their parents."""
    log: list[str] = []
    sagas: list[tuple[str, Saga]] = []
    for level, below in (("root", "mid"), ("mid", "leaf"), ("leaf", None)):
        saga = Saga(level)

        @saga.step("one")
        async def one(scope: Scope, message: Message[Any], below: str | None = below) -> None:
            log.append(f"{scope.saga} one")
            if below is not None:
                await scope.launch(below, {})

        @one.rollback
        async def undo_one(scope: Scope, message: Message[Any], f: BaseException) -> None:
            log.append(f"undo {scope.saga} one: {type(f).__name__}")

        @saga.step("two")
        async def two(scope: Scope, message: Message[Any]) -> None:
            log.append(f"{scope.saga} two")

        @two.rollback
        async def undo_two(scope: Scope, message: Message[Any], f: BaseException) -> None:
            log.append(f"undo {scope.saga} two: {type(f).__name__}")

        sagas.append((level, saga))

    async with make_coop(listen=listen) as coop:
        for topic, saga in sagas:
            coop.subscribe(topic, saga)
        handle = await coop.launch("root", {})
        assert (await handle.wait(timeout=WAIT)).status == "committed"
        log.clear()
        undo = await coop.rollback(handle.id, "customer returned the goods", source="returns")
        assert undo.id == handle.id
        outcome = await undo.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "rolled_back"
    assert log == [
        "undo root two: RollbackRequested",
        "undo mid two: ParentSaidSo",
        "undo leaf two: ParentSaidSo",
        "undo leaf one: ParentSaidSo",
        "undo mid one: ParentSaidSo",
        "undo root one: RollbackRequested",
    ]
    assert describe(outcome.failure) == 'RollbackRequested("customer returned the goods")'
    assert outcome.failure is not None
    assert outcome.failure.source == "returns"
    assert [e.saga for e in events if e.type == "ROLLED_BACK"] == ["leaf", "mid", "root"]
    undo_request = [e for e in events if e.type == "ROLLBACK_EMITTED" and e.saga is None]
    assert len(undo_request) == 1
    assert of_saga(events, "root")[5:] == [
        ("ROLLING_BACK", None),
        ("SUSPENDED", "Rollback of two (rolling back child scopes)"),
        ("SUSPENDED", "Rollback of two"),
        ("ROLLBACK_EMITTED", "Rollback of one (rolling back child scopes)"),
        ("SUSPENDED", "Rollback of one (rolling back child scopes)"),
        ("SUSPENDED", "Rollback of one"),
        ("ROLLED_BACK", "Rollback of one"),
    ]


@both_modes
async def test_undo_is_refused_unless_the_hierarchy_committed(
    make_coop: MakeCoop, listen: bool
) -> None:
    """Undo of a running hierarchy, or of one that rolled back, raises ScoopyError."""
    log: list[str] = []
    failing = Saga("failing")

    add_step(failing, "broken", raises=MyException("nope"))

    async with make_coop(listen=listen) as coop:
        for topic, saga in waiting_hierarchy(log):
            coop.subscribe(topic, saga)
        coop.subscribe("failing", failing)
        running = await coop.launch("parent", {})
        await wait_for_event(coop, running.id, is_asleep)
        with pytest.raises(ScoopyError, match="still running"):
            await coop.rollback(running.id, "too early")
        child_run = run_of(await coop.events(running.id), "child")
        with pytest.raises(ScoopyError, match="still running"):
            await coop.rollback(child_run, "too early")

        failed = await coop.launch("failing", {})
        assert (await failed.wait(timeout=WAIT)).status == "rolled_back"
        with pytest.raises(ScoopyError, match="only committed runs can be undone"):
            await coop.rollback(failed.id, "nothing to undo")

        await coop.cancel(running.id, "clean up")
        assert (await running.wait(timeout=WAIT)).status == "rolled_back"
        events = await coop.events(running.id)

    assert not [e for e in events if e.type == "ROLLBACK_EMITTED" and e.saga is None]
    assert log == ["undo grandchild", "undo child", "undo parent"]


@both_modes
async def test_undo_of_one_child_run_undoes_only_its_sub_tree(
    make_coop: MakeCoop, listen: bool
) -> None:
    """Undo addresses a run, not its message: the sibling on the same message is untouched.

    Undoing the root afterwards compensates the rest and does not redo the sub-tree.
    """
    log: list[str] = []
    async with make_coop(listen=listen) as coop:
        for topic, saga in undo_target(log):
            coop.subscribe(topic, saga)
        handle = await coop.launch("root", {})
        assert (await handle.wait(timeout=WAIT)).status == "committed"
        a_run = run_of(await coop.events(handle.id), "a")
        await coop.rollback(a_run, "partial refund")
        await wait_for_event(coop, handle.id, lambda e: e.saga == "a" and e.type == "ROLLED_BACK")
        assert log == ["undo a-grand: ParentSaidSo", "undo a: RollbackRequested"]
        runs = {run.saga: run.status for run in await coop.runs(handle.id)}
        assert runs == {
            "root": "committed",
            "a": "rolled_back",
            "a-grand": "rolled_back",
            "b": "committed",
            "b-grand": "committed",
        }
        log.clear()
        outcome = await (await coop.rollback(handle.id, "full refund")).wait(timeout=WAIT)

    assert outcome.status == "rolled_back"
    assert log == ["undo b-grand: ParentSaidSo", "undo b: ParentSaidSo", "undo root"]


async def test_waiting_on_a_sub_tree_undo_waits_for_its_rollback(make_coop: MakeCoop) -> None:
    """The handle `coop.rollback` returns for a sub-tree undo waits until that undo finished."""
    log: list[str] = []
    async with make_coop() as coop:
        for topic, saga in undo_target(log):
            coop.subscribe(topic, saga)
        handle = await coop.launch("root", {})
        assert (await handle.wait(timeout=WAIT)).status == "committed"
        a_run = run_of(await coop.events(handle.id), "a")
        undo = await coop.rollback(a_run, "partial refund")
        await undo.wait(timeout=WAIT)
        finished = list(log)
        await wait_for_event(coop, handle.id, lambda e: e.saga == "a" and e.type == "ROLLED_BACK")

    assert finished == ["undo a-grand: ParentSaidSo", "undo a: RollbackRequested"]


@both_modes
async def test_undo_after_a_happy_path_deadline_passed_is_judged_by_the_rollback_path(
    make_coop: MakeCoop, db: asyncpg.Connection[asyncpg.Record], listen: bool
) -> None:
    """A hierarchy that committed within its happy-path deadline can be undone after that
    deadline: compensations asking `give_up_if_needed()` are on the rollback path."""
    undone: list[str] = []
    saga = Saga("booking")

    book = add_step(saga, "book")

    @book.rollback
    async def unbook(scope: Scope, message: Message[Any], failure: BaseException) -> None:
        await scope.give_up_if_needed()
        undone.append("unbook")

    limit = deadline(0.3, "caller")
    async with make_coop(listen=listen) as coop:
        coop.subscribe("bookings", saga)
        handle = await coop.launch("bookings", {}, context={HAPPY_PATH_DEADLINE: limit})
        assert (await handle.wait(timeout=WAIT)).status == "committed"

        async def deadline_passed() -> bool:
            now = await db.fetchval("SELECT clock_timestamp()")
            return bool(now > limit.at)

        await eventually(deadline_passed)
        await coop.rollback(handle.id, "customer cancelled")
        outcome = await handle.wait(timeout=WAIT)

    assert outcome.status == "rolled_back", outcome.failure
    assert undone == ["unbook"]
