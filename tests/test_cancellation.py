"""Cancellation (`coop.cancel`): a hierarchy, a sub-tree or a single run gives up and rolls
back, children first; what is already rolling back is not stopped.
"""

from __future__ import annotations

from typing import Any

import anyio

from scoopy import CooperationError, GaveUp, Message, NextStep, Saga, Scope

from .apps.hierarchies import is_asleep, waiting_hierarchy
from .apps.steps import MyException, add_step, logged
from .helpers import WAIT, MakeCoop, both_modes, wait_for_event
from .reading import describe, failure_of, failure_types, of_saga, run_of


@both_modes
async def test_cancelling_a_suspended_hierarchy_rolls_it_back_children_first(
    make_coop: MakeCoop, listen: bool
) -> None:
    """Cancel the root while all three levels wait: every level gives up and unwinds in order."""
    log: list[str] = []
    async with make_coop(listen=listen) as coop:
        for topic, saga in waiting_hierarchy(log):
            coop.subscribe(topic, saga)
        handle = await coop.launch("parent", {})
        await wait_for_event(coop, handle.id, is_asleep)
        assert await coop.cancel(handle.id, "customer cancelled", source="support-desk")
        assert not await coop.cancel(handle.id, "asked twice")
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "rolled_back"
    assert log == ["undo grandchild", "undo child", "undo parent"]
    [request] = [e for e in events if e.type == "CANCELLATION_REQUESTED"]
    assert request.saga is None
    assert describe(request.failure) == 'CancellationRequested("customer cancelled")'
    assert request.failure is not None
    assert request.failure.source == "support-desk"
    finished = [e.saga for e in events if e.type == "ROLLED_BACK"]
    assert finished == ["grandchild", "child", "parent"]
    grand = failure_of(events, "grandchild", "ROLLING_BACK")
    assert grand.type == "scoopy.GaveUp"
    assert grand.message == "Gave up: customer cancelled"
    assert failure_types(grand) == ["scoopy.GaveUp", "scoopy.CancellationRequested"]
    assert outcome.failure is not None
    assert outcome.failure.type == "scoopy.GaveUp"
    assert "scoopy.CancellationRequested" in failure_types(outcome.failure)
    assert events.index(request) < min(i for i, e in enumerate(events) if e.type == "ROLLING_BACK")


@both_modes
async def test_cancelling_during_a_long_step_gives_up_at_the_check(
    make_coop: MakeCoop, listen: bool
) -> None:
    """A running step is not interrupted; `give_up_if_needed` raises GaveUp once cancelled."""
    log: list[str] = []
    running = anyio.Event()
    proceed = anyio.Event()
    saga = Saga("report")

    logged(saga, "gather", log)

    @saga.step()
    async def crunch(scope: Scope, message: Message[Any]) -> None:
        running.set()
        await proceed.wait()
        try:
            await scope.give_up_if_needed()
        except GaveUp:
            log.append("gave up")
            raise
        log.append("never: cancelled")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("report", saga)
        handle = await coop.launch("report", {})
        with anyio.fail_after(WAIT):
            await running.wait()
            assert await coop.cancel(handle.id, "too slow")
        proceed.set()
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "rolled_back"
    assert log == ["gather", "gave up", "ungather"]
    assert of_saga(events, "report") == [
        ("SEEN", None),
        ("SUSPENDED", "gather"),
        ("ROLLING_BACK", "crunch"),
        ("SUSPENDED", "Rollback of gather (rolling back child scopes)"),
        ("SUSPENDED", "Rollback of gather"),
        ("ROLLED_BACK", "Rollback of gather"),
    ]
    assert [e.type for e in events].count("CANCELLATION_REQUESTED") == 1
    assert describe(outcome.failure) == 'GaveUp(CancellationRequested("too slow"))'
    assert outcome.failure is not None
    assert outcome.failure.message == "Gave up: too slow"


@both_modes
async def test_cancelling_a_child_cancels_only_its_sub_tree(
    make_coop: MakeCoop, listen: bool
) -> None:
    """Cancel one child run: it and its grandchild roll back; the sibling and parent go on."""
    log: list[str] = []
    seen_by_handler: list[list[str]] = []
    parent = Saga("parent")
    fan_out = add_step(parent, "fan_out", launches="children")

    @fan_out.on_child_failure
    async def tolerate(
        scope: Scope, message: Message[Any], failure: CooperationError
    ) -> NextStep | None:
        seen_by_handler.append([f.message for f in failure.failure.walk()])
        return None

    add_step(parent, "after", log, does="parent continues")
    slow = Saga("slow-child")
    add_step(slow, "start", log, launches="grandchild", undo="undo slow-child")
    fast = Saga("fast-child")
    add_step(fast, "quick", log, does="fast-child done", undo="never: sibling not cancelled")
    grandchild = Saga("grandchild")
    add_step(grandchild, "hold", log, sleeps=3600, undo="undo grandchild")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("parent", parent)
        coop.subscribe("children", slow)
        coop.subscribe("children", fast)
        coop.subscribe("grandchild", grandchild)
        handle = await coop.launch("parent", {})
        await wait_for_event(coop, handle.id, is_asleep)
        await wait_for_event(
            coop, handle.id, lambda e: e.saga == "fast-child" and e.type == "COMMITTED"
        )
        target = run_of(await coop.events(handle.id), "slow-child")
        assert await coop.cancel(target, "not needed any more")
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "committed", outcome.failure
    assert log == ["fast-child done", "undo grandchild", "undo slow-child", "parent continues"]
    [request] = [e for e in events if e.type == "CANCELLATION_REQUESTED"]
    assert request.run_id == target
    assert len(seen_by_handler) == 1
    assert "not needed any more" in seen_by_handler[0]
    assert [t for t, _ in of_saga(events, "fast-child")] == ["SEEN", "SUSPENDED", "COMMITTED"]
    assert of_saga(events, "parent")[-2:] == [("SUSPENDED", "after"), ("COMMITTED", "after")]


@both_modes
async def test_cancelling_before_a_child_started_skips_it(
    make_coop: MakeCoop, listen: bool
) -> None:
    """A child that has not started when its parent is cancelled never runs."""
    log: list[str] = []
    parent = Saga("parent")
    add_step(parent, "order", log, launches="child", undo="undo parent")
    child = Saga("child")
    add_step(child, "pack", log, does="never: skipped")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("parent", parent)
        coop.subscribe("child", child)
        await coop.pause(child, "maintenance")
        handle = await coop.launch("parent", {})
        await wait_for_event(
            coop, handle.id, lambda e: e.saga == "parent" and e.type == "SUSPENDED"
        )
        await coop.cancel(handle.id, "changed my mind")
        outcome = await handle.wait(timeout=WAIT)
        await coop.resume(child)
        runs = {run.saga: run.status for run in await coop.runs(handle.id)}

    assert outcome.status == "rolled_back"
    assert describe(outcome.failure) == 'GaveUp(CancellationRequested("changed my mind"))'
    assert log == ["undo parent"]
    assert runs == {"parent": "rolled_back", "child": "skipped"}


@both_modes
async def test_cancellation_requested_during_a_rollback_does_not_stop_it(
    make_coop: MakeCoop, listen: bool
) -> None:
    """Cancelling a hierarchy that is already rolling back changes nothing: it compensates fully."""
    log: list[str] = []
    compensating = anyio.Event()
    proceed = anyio.Event()
    saga = Saga("transfer")
    add_step(saga, "debit", log, undo="undebit")
    hold = add_step(saga, "hold")

    @hold.rollback
    async def unhold(scope: Scope, message: Message[Any], f: BaseException) -> None:
        compensating.set()
        await proceed.wait()
        log.append("unhold")

    add_step(saga, "credit", raises=MyException("account closed"))

    async with make_coop(listen=listen) as coop:
        coop.subscribe("transfer", saga)
        handle = await coop.launch("transfer", {})
        with anyio.fail_after(WAIT):
            await compensating.wait()
            assert await coop.cancel(handle.id, "operator panic")
        proceed.set()
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "rolled_back"
    assert log == ["unhold", "undebit"]
    assert describe(outcome.failure) == 'MyException("account closed")'
    assert "CANCELLATION_REQUESTED" in [e.type for e in events]
    assert of_saga(events, "transfer")[-1] == ("ROLLED_BACK", "Rollback of debit")


async def test_a_cancellation_during_a_step_stops_the_run_before_it_sleeps(
    make_coop: MakeCoop,
) -> None:
    """Cancellation is checked at the end of every step: a run cancelled while its step runs
    gives up when the step ends instead of first sleeping what the step asked for (else an
    `unschedule` racing a link's "wait" step would hang for a whole period)."""
    inside = anyio.Event()
    go_on = anyio.Event()
    sleepy = Saga("sleepy")

    @sleepy.step()
    async def one(scope: Scope, message: Message[Any]) -> None:
        inside.set()
        await go_on.wait()
        await scope.sleep(30)

    add_step(sleepy, "two")

    async with make_coop() as coop:
        coop.subscribe("sleepy", sleepy)
        handle = await coop.launch("sleepy", {})
        with anyio.fail_after(WAIT):
            await inside.wait()
        assert await coop.cancel(handle.id, "stop now")
        go_on.set()
        outcome = await handle.wait(timeout=2.0)  # not 30 s

    assert outcome.status == "rolled_back"
    assert "scoopy.CancellationRequested" in failure_types(outcome.failure)
