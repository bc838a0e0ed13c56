"""Deadlines: happy-path, rollback and absolute deadlines make a run give up; children inherit
a deadline and may only tighten it.
"""

from __future__ import annotations

from typing import Any

import anyio

from scoopy import (
    ABSOLUTE_DEADLINE,
    HAPPY_PATH_DEADLINE,
    ROLLBACK_DEADLINE,
    CooperationError,
    Deadline,
    GaveUp,
    Message,
    NextStep,
    Saga,
    Scope,
    deadline,
)

from .apps.steps import MyException, add_step, logged
from .helpers import RECHECK, WAIT, MakeCoop, both_modes, run_to_end
from .reading import describe, failure_of, failure_types, of_saga


@both_modes
async def test_happy_path_deadline_missed_while_waiting_for_a_slow_child(
    make_coop: MakeCoop, listen: bool
) -> None:
    """The child sleeps past the inherited deadline: both give up; the failure names it."""
    log: list[str] = []
    checkout = Saga("checkout")
    add_step(checkout, "reserve", log, launches="stock", undo="undo checkout")
    stock = Saga("stock")
    add_step(stock, "backorder", log, sleeps=3600, undo="undo stock")
    add_step(stock, "deliver", log, does="never delivered")

    limit = deadline(0.6, "checkout-sla")
    _, outcome, events = await run_to_end(
        make_coop(listen=listen),
        [("checkout", checkout), ("stock", stock)],
        "checkout",
        context={HAPPY_PATH_DEADLINE: limit},
    )

    assert outcome.status == "rolled_back"
    assert log == ["undo stock", "undo checkout"]
    failure = outcome.failure
    assert failure is not None
    assert failure.type == "scoopy.GaveUp"
    assert failure.message.startswith("Gave up: Missed happy path deadline of checkout-sla at ")
    missed = failure.causes[0]
    assert missed.type == "scoopy.DeadlineMissed"
    assert missed.source == "checkout-sla"
    assert limit.at.isoformat() in missed.message
    assert failure_types(failure)[2:4] == ["scoopy.ChildRolledBack", "scoopy.GaveUp"]
    child = failure_of(events, "stock", "ROLLING_BACK")
    assert child.message.startswith("Gave up: Missed happy path deadline of checkout-sla")
    # Woken at the deadline, the child gives up before the step it was about to take.
    assert of_saga(events, "stock") == [
        ("SEEN", None),
        ("SUSPENDED", "backorder"),
        ("ROLLING_BACK", "deliver"),
        ("SUSPENDED", "Rollback of backorder (rolling back child scopes)"),
        ("SUSPENDED", "Rollback of backorder"),
        ("ROLLED_BACK", "Rollback of backorder"),
    ]
    assert failure_of(events, "checkout", "ROLLING_BACK") == failure
    assert min(e.time for e in events if e.type == "ROLLING_BACK") >= limit.at


@both_modes
async def test_rollback_deadline_halts_a_rollback_at_the_next_boundary(
    make_coop: MakeCoop, listen: bool
) -> None:
    """A compensation that outlasts the rollback deadline gives up in its own transaction."""
    log: list[str] = []
    saga = Saga("refund")
    add_step(saga, "first", log, undo="never: rollback deadline passed")
    second = add_step(saga, "second")

    @second.rollback
    async def second_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("slow compensation")
        limit = scope.context[ROLLBACK_DEADLINE]
        # The clock is what is under test: outlast the deadline.
        await anyio.sleep((limit.at - scope.now()).total_seconds() + 0.05)

    @saga.step()
    async def third(scope: Scope, message: Message[Any]) -> None:
        scope.context[ROLLBACK_DEADLINE] = deadline(0.3, "refund-window")
        raise MyException("payment provider rejected")

    _, outcome, events = await run_to_end(make_coop(listen=listen), [("refund", saga)], "refund")

    assert log == ["slow compensation"]
    assert outcome.status == "rollback_failed"
    # Its work is discarded (no SUSPENDED for it) and the rollback halts there.
    assert of_saga(events, "refund")[-2:] == [
        ("SUSPENDED", "Rollback of second (rolling back child scopes)"),
        ("ROLLBACK_FAILED", "Rollback of second"),
    ]
    halted = failure_of(events, "refund", "ROLLBACK_FAILED")
    assert halted.type == "scoopy.GaveUp"
    assert halted.message.startswith("Gave up: Missed rollback deadline of refund-window at ")
    assert halted.causes[0].source == "refund-window"
    assert describe(outcome.failure) == (
        f'RollbackFailed({describe(halted)}, MyException("payment provider rejected"))'
    )


@both_modes
async def test_absolute_deadline_applies_to_both_paths(make_coop: MakeCoop, listen: bool) -> None:
    """Missed on the happy path, the absolute deadline also stops the rollback at once."""
    log: list[str] = []
    saga = Saga("batch")
    add_step(saga, "load", log, undo="never: absolute deadline passed")

    @saga.step()
    async def transform(scope: Scope, message: Message[Any]) -> None:
        limit = scope.context[ABSOLUTE_DEADLINE]
        await anyio.sleep((limit.at - scope.now()).total_seconds() + 0.05)

    @transform.rollback
    async def untransform(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("never: absolute deadline passed")

    add_step(saga, "publish", log, does="never published")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("batch", saga)
        limit = deadline(0.3, "nightly-window")
        handle = await coop.launch("batch", {}, context={ABSOLUTE_DEADLINE: limit})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert log == []
    assert outcome.status == "rollback_failed"
    assert of_saga(events, "batch") == [
        ("SEEN", None),
        ("SUSPENDED", "load"),
        # `transform` overran: it gives up inside its own transaction, so none of it
        # commits (nothing left uncompensated), and the rollback gives up at once, before
        # the first sub-step that would have run.
        ("ROLLING_BACK", "transform"),
        ("ROLLBACK_FAILED", "Rollback of load (rolling back child scopes)"),
    ]
    gave_up = failure_of(events, "batch", "ROLLING_BACK")
    assert gave_up.message.startswith("Gave up: Missed absolute deadline of nightly-window at ")
    halted = failure_of(events, "batch", "ROLLBACK_FAILED")
    assert halted.message.startswith("Gave up: Missed absolute deadline of nightly-window at ")
    assert outcome.failure is not None
    assert outcome.failure.type == "scoopy.RollbackFailed"
    assert outcome.failure.causes == [halted, gave_up]


@both_modes
async def test_a_child_cannot_loosen_an_inherited_deadline(
    make_coop: MakeCoop, listen: bool
) -> None:
    """A later deadline, passed at launch or set in the child, keeps the earlier one (and fires)."""
    seen: list[Deadline] = []
    parent = Saga("parent")

    @parent.step()
    async def delegate(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("child", {}, context={HAPPY_PATH_DEADLINE: deadline(60, "launch")})

    child = Saga("child")

    @child.step()
    async def linger(scope: Scope, message: Message[Any]) -> None:
        seen.append(scope.context[HAPPY_PATH_DEADLINE])
        scope.context[HAPPY_PATH_DEADLINE] = deadline(120, "child itself")
        seen.append(scope.context[HAPPY_PATH_DEADLINE])
        await scope.sleep(3600)

    add_step(child, "never")

    limit = deadline(0.5, "root")
    _, outcome, events = await run_to_end(
        make_coop(listen=listen),
        [("parent", parent), ("child", child)],
        "parent",
        context={HAPPY_PATH_DEADLINE: limit},
    )

    assert [(d.at, d.source) for d in seen] == [(limit.at, "root"), (limit.at, "root")]
    assert [o.source for o in seen[0].trace] == ["launch"]
    assert [o.source for o in seen[1].trace] == ["launch", "child itself"]
    assert outcome.status == "rolled_back"
    child_failure = failure_of(events, "child", "ROLLING_BACK")
    assert child_failure.causes[0].source == "root"
    assert "looser deadlines: launch at" in child_failure.causes[0].message
    assert outcome.failure is not None
    assert outcome.failure.causes[0].source == "root"


@both_modes
async def test_a_parent_can_tighten_a_childs_deadline_and_recover(
    make_coop: MakeCoop, listen: bool
) -> None:
    """A stricter deadline passed at launch binds the child only; the parent handles the miss."""
    seen: list[str] = []
    parent = Saga("parent")

    @parent.step()
    async def quote(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("supplier", {}, context={HAPPY_PATH_DEADLINE: deadline(0.3, "quote")})

    @quote.on_child_failure
    async def without_quote(
        scope: Scope, message: Message[Any], failure: CooperationError
    ) -> NextStep | None:
        [missed] = [f for f in failure.failure.walk() if f.type == "scoopy.DeadlineMissed"]
        seen.append(missed.source)
        seen.append(scope.context[HAPPY_PATH_DEADLINE].source)
        return None

    add_step(parent, "proceed", seen, does="proceed")
    supplier = Saga("supplier")
    add_step(supplier, "wait_for_quote", sleeps=3600)
    add_step(supplier, "answer", seen, does="never answered")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("parent", parent)
        coop.subscribe("supplier", supplier)
        limit = deadline(60, "root")
        handle = await coop.launch("parent", {}, context={HAPPY_PATH_DEADLINE: limit})
        outcome = await handle.wait(timeout=WAIT)

    assert outcome.status == "committed", outcome.failure
    # The child missed "quote"; the parent still runs under its own, looser "root" deadline.
    assert seen == ["quote", "root", "proceed"]


@both_modes
async def test_give_up_if_needed_stops_a_long_step_when_its_happy_path_deadline_passes(
    make_coop: MakeCoop, listen: bool
) -> None:
    """A long step that keeps asking `give_up_if_needed()` passes the checks before the
    happy-path deadline and stops at the first check after it: the rest of the step never
    runs, the run rolls back (earlier steps compensated, the failing one not), and the failure
    names the deadline, when it was and who set it."""
    log: list[str] = []
    checks_passed: list[int] = []
    saga = Saga("report")

    logged(saga, "gather", log)

    @saga.step()
    async def crunch(scope: Scope, message: Message[Any]) -> None:
        log.append("crunch")
        with anyio.fail_after(WAIT):  # a bound on the test, not its outcome
            while True:  # a chunk of work, then ask whether to go on
                try:
                    await scope.give_up_if_needed()
                except GaveUp:
                    log.append("gave up")
                    raise
                checks_passed.append(1)
                await anyio.sleep(RECHECK)  # the "work": its length decides nothing

    @crunch.rollback
    async def uncrunch(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("never: the failing step committed nothing to compensate")

    add_step(saga, "publish", log, does="never: published")

    limit = deadline(1.0, "report-sla")
    _, outcome, events = await run_to_end(
        make_coop(listen=listen), [("report", saga)], "report", context={HAPPY_PATH_DEADLINE: limit}
    )

    assert outcome.status == "rolled_back"
    assert log == ["gather", "crunch", "gave up", "ungather"]
    assert checks_passed  # the deadline passed while the step was running
    assert of_saga(events, "report") == [
        ("SEEN", None),
        ("SUSPENDED", "gather"),
        ("ROLLING_BACK", "crunch"),
        ("SUSPENDED", "Rollback of gather (rolling back child scopes)"),
        ("SUSPENDED", "Rollback of gather"),
        ("ROLLED_BACK", "Rollback of gather"),
    ]
    failure = outcome.failure
    assert failure is not None
    assert failure.type == "scoopy.GaveUp"
    assert failure.message.startswith("Gave up: Missed happy path deadline of report-sla at ")
    [missed] = failure.causes
    assert missed.type == "scoopy.DeadlineMissed"
    assert missed.source == "report-sla"
    assert limit.at.isoformat() in missed.message
    assert failure_of(events, "report", "ROLLING_BACK") == failure
    assert min(e.time for e in events if e.type == "ROLLING_BACK") >= limit.at
