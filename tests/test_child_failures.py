"""Failing children: distributed exceptions nest per level and round-trip as JSON;
child-failure handlers retry, swallow or raise; children whose compensation fails.
"""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest

from scoopy import (
    ChildRolledBack,
    CooperationError,
    CooperationFailure,
    Message,
    NextStep,
    Saga,
    Scope,
)

from .apps.hierarchies import three_level_sagas
from .apps.steps import MyException, add_step, logged
from .helpers import WAIT, MakeCoop, both_modes, run_to_end
from .reading import describe, failure_of, failure_types, of_saga, run_of

# -- distributed exceptions ---------------------------------------------------------------


@both_modes
async def test_failure_nests_per_level_with_sources_and_round_trips_as_json(
    make_coop: MakeCoop, listen: bool
) -> None:
    """Grandchild failure inside the child's ChildRolledBack inside the parent's; JSON is stable."""
    log: list[str] = []
    _, outcome, events = await run_to_end(
        make_coop(listen=listen), three_level_sagas(log), "parent-topic"
    )

    assert log[:5] == ["1", "2", "3", "4", "5"]
    parent_run = run_of(events, "parent-handler")
    child_run = run_of(events, "child-handler")
    grandchild_run = run_of(events, "grandchild-handler")

    top = outcome.failure
    assert top is not None
    assert top.type == "scoopy.ChildRolledBack"
    assert top.message == "Child failure occurred while suspended in step [First parent step]"
    assert top.source == f"parent-handler[{parent_run}]"
    assert top.stack_trace == []
    [middle] = top.causes
    assert middle.type == "scoopy.ChildRolledBack"
    assert middle.message == "Child failure occurred while suspended in step [Second child step]"
    assert middle.source == f"child-handler[{child_run}]"
    [leaf] = middle.causes
    assert leaf.type == f"{MyException.__module__}.MyException"
    assert leaf.message == "My exception message"
    assert leaf.source == f"grandchild-handler[{grandchild_run}]"
    assert leaf.causes == []
    assert any(
        frame.function == "grandchild_second" and frame.file.endswith("hierarchies.py")
        for frame in leaf.stack_trace
    )
    # Each level's ROLLING_BACK carries that level's view of the failure.
    assert failure_of(events, "grandchild-handler", "ROLLING_BACK") == leaf
    assert failure_of(events, "child-handler", "ROLLING_BACK") == middle
    assert failure_of(events, "parent-handler", "ROLLING_BACK") == top

    # str() of the exception renders the whole distributed stack trace, outermost first.
    with pytest.raises(ChildRolledBack) as raised:
        outcome.raise_for_failure()
    rendered = str(raised.value)
    expected_in_order = [
        "Child failure occurred while suspended in step [First parent step]",
        f"parent-handler[{parent_run}]",
        "Child failure occurred while suspended in step [Second child step]",
        f"child-handler[{child_run}]",
        "MyException: My exception message",
        f"grandchild-handler[{grandchild_run}]",
        "grandchild_second",
    ]
    positions = [rendered.index(part) for part in expected_in_order]
    assert positions == sorted(positions), rendered

    # JSON shape and round trip.
    raw = top.to_json()
    decoded = msgspec.json.decode(raw)
    assert list(decoded) == ["type", "message", "source", "stack_trace", "causes"]
    leaf_json = decoded["causes"][0]["causes"][0]
    assert leaf_json["stack_trace"]
    assert all(set(frame) == {"file", "function", "line"} for frame in leaf_json["stack_trace"])
    again = CooperationFailure.from_json(raw)
    assert again == top
    assert CooperationFailure.from_json(raw.decode()) == top
    error = again.to_exception()
    assert isinstance(error, ChildRolledBack)
    assert isinstance(error, CooperationError)
    assert error.failure == top
    assert error.failure.to_json() == raw


@both_modes
async def test_several_failing_children_of_one_step_are_all_reported(
    make_coop: MakeCoop, listen: bool
) -> None:
    """Two of three children fail: one ChildRolledBack with both causes; the third is undone."""
    log: list[str] = []
    parent = Saga("notifier")
    add_step(parent, "notify all", launches="notify")
    sagas: list[Saga] = []
    for name, error in (("email", "smtp down"), ("sms", "no signal")):
        failing = Saga(name)
        add_step(failing, "send", raises=MyException(error))
        sagas.append(failing)
    push = Saga("push")
    add_step(push, "send", log, does="pushed", undo="unpushed")
    sagas.append(push)

    _, outcome, events = await run_to_end(
        make_coop(listen=listen),
        [("notifier", parent), *(("notify", saga) for saga in sagas)],
        "notifier",
    )

    assert outcome.status == "rolled_back"
    failure = outcome.failure
    assert failure is not None
    assert failure.type == "scoopy.ChildRolledBack"
    assert failure.message == "Child failure occurred while suspended in step [notify all]"
    assert sorted(c.message for c in failure.causes) == ["no signal", "smtp down"]
    assert {c.source for c in failure.causes} == {
        f"email[{run_of(events, 'email')}]",
        f"sms[{run_of(events, 'sms')}]",
    }
    assert log == ["pushed", "unpushed"]
    rendered = str(failure.to_exception())
    assert "cause 1 of 2" in rendered
    assert "cause 2 of 2" in rendered


@both_modes
async def test_several_failing_child_compensations_are_all_reported(
    make_coop: MakeCoop, listen: bool
) -> None:
    """Two children fail to roll back: the parent still compensates itself; both are kept."""
    log: list[str] = []
    parent = Saga("parent")
    add_step(parent, "fan out", log, launches="work", undo="undo fan out")
    add_step(parent, "fail", raises=MyException("parent failed"))
    sagas = []
    for name in ("x", "y"):
        child = Saga(name)
        add_step(child, "do", undo_raises=MyException(f"cannot undo {name}"))
        sagas.append(child)

    _, outcome, events = await run_to_end(
        make_coop(listen=listen),
        [("parent", parent), *(("work", saga) for saga in sagas)],
        "parent",
    )

    assert outcome.status == "rollback_failed"
    assert log == ["undo fan out"]
    failure = outcome.failure
    assert failure is not None
    assert failure.type == "scoopy.RollbackFailed"
    messages = [f.message for f in failure.walk()]
    assert "cannot undo x" in messages
    assert "cannot undo y" in messages
    assert failure.causes[-1].message == "parent failed"  # the original cause comes last
    assert of_saga(events, "parent")[-1] == ("ROLLBACK_FAILED", "Rollback of fan out")


# -- on_child_failure ---------------------------------------------------------------------


class PaymentAbandoned(Exception):
    """Raised by a child-failure handler that stops retrying."""


@both_modes
async def test_child_failure_handler_retries_and_the_saga_commits(
    make_coop: MakeCoop, listen: bool
) -> None:
    """The handler relaunches; the saga waits for the retry, continues and commits."""
    log: list[str] = []
    handled: list[tuple[int | None, list[str]]] = []
    order = Saga("order")

    @order.step()
    async def place(scope: Scope, message: Message[Any]) -> None:
        log.append("place")
        await scope.launch("payment", {"try": 0})

    @place.on_child_failure
    async def retry_payment(
        scope: Scope, message: Message[Any], failure: CooperationError
    ) -> NextStep | None:
        handled.append((scope.handler_iteration, [c.message for c in failure.causes]))
        await scope.launch("payment", {"try": 1})
        return None

    add_step(order, "ship", log, does="ship")

    payment = Saga("payment")

    @payment.step()
    async def charge(scope: Scope, message: Message[Any]) -> None:
        log.append(f"charge {message.payload['try']}")
        if message.payload["try"] == 0:
            raise MyException("card declined")

    _, outcome, events = await run_to_end(
        make_coop(listen=listen), [("order", order), ("payment", payment)], "order"
    )

    assert outcome.status == "committed", outcome.failure
    assert handled == [(0, ["card declined"])]
    assert log == ["place", "charge 0", "charge 1", "ship"]
    assert [
        (e.type, e.step, e.phase, e.handler_iteration) for e in events if e.saga == "order"
    ] == [
        ("SEEN", None, None, None),
        ("EMITTED", "place", None, None),
        ("SUSPENDED", "place", "step", None),
        ("EMITTED", "place", None, None),  # the retry, launched by the handler
        ("SUSPENDED", "place", "handler", 0),
        ("SUSPENDED", "ship", "step", None),
        ("COMMITTED", "ship", None, None),
    ]


@both_modes
async def test_child_failure_handler_swallows_twice_then_raises(
    make_coop: MakeCoop, listen: bool
) -> None:
    """Handler invocations are numbered 0, 1, 2; raising rolls the saga back with its error."""
    log: list[str] = []
    iterations: list[int | None] = []
    order = Saga("order")
    place = add_step(order, "place", log, launches="payment", undo="unplace")

    @place.on_child_failure
    async def retry_payment(
        scope: Scope, message: Message[Any], failure: CooperationError
    ) -> NextStep | None:
        iterations.append(scope.handler_iteration)
        if scope.handler_iteration is not None and scope.handler_iteration >= 2:
            raise PaymentAbandoned("three declines") from failure
        await scope.launch("payment", {})
        return None

    add_step(order, "ship", log, does="never shipped")
    payment = Saga("payment")
    add_step(payment, "charge", log, does="declined", raises=MyException("card declined"))

    _, outcome, events = await run_to_end(
        make_coop(listen=listen), [("order", order), ("payment", payment)], "order"
    )

    assert outcome.status == "rolled_back"
    assert iterations == [0, 1, 2]
    assert log == ["declined", "declined", "declined", "unplace"]
    failure = outcome.failure
    assert failure is not None
    assert failure.type == f"{PaymentAbandoned.__module__}.PaymentAbandoned"
    assert failure_types(failure)[1:] == [
        "scoopy.ChildRolledBack",
        f"{MyException.__module__}.MyException",
    ]
    children = "Rollback of place (rolling back child scopes)"
    assert of_saga(events, "order") == [
        ("SEEN", None),
        ("EMITTED", "place"),
        ("SUSPENDED", "place"),
        ("EMITTED", "place"),  # retry launched by handler invocation 0
        ("SUSPENDED", "place"),
        ("EMITTED", "place"),  # retry launched by handler invocation 1
        ("SUSPENDED", "place"),
        ("ROLLING_BACK", "place"),  # handler invocation 2 raised
        ("ROLLBACK_EMITTED", children),  # the retry of invocation 1
        ("SUSPENDED", children),
        ("ROLLBACK_EMITTED", children),  # the retry of invocation 0
        ("SUSPENDED", children),
        ("ROLLBACK_EMITTED", children),  # the step's own launch
        ("SUSPENDED", children),
        ("SUSPENDED", "Rollback of place"),
        ("ROLLED_BACK", "Rollback of place"),
    ]


@both_modes
async def test_handled_child_failure_is_consumed(make_coop: MakeCoop, listen: bool) -> None:
    """A swallowed child failure is not delivered again when a later step's children finish."""
    calls: list[int | None] = []
    log: list[str] = []
    saga = Saga("importer")
    optional = add_step(saga, "optional", launches="enrich")

    @optional.on_child_failure
    async def ignore(
        scope: Scope, message: Message[Any], failure: CooperationError
    ) -> NextStep | None:
        calls.append(scope.handler_iteration)
        return None

    add_step(saga, "required", log, does="required", launches="store")
    add_step(saga, "done", log, does="done")
    enrich = Saga("enrich")
    add_step(enrich, "enrich_it", raises=MyException("enrichment unavailable"))
    store = Saga("store")
    add_step(store, "store_it", log, does="stored")

    _, outcome, _ = await run_to_end(
        make_coop(listen=listen),
        [("importer", saga), ("enrich", enrich), ("store", store)],
        "importer",
    )

    assert outcome.status == "committed", outcome.failure
    assert calls == [0]
    assert log == ["required", "stored", "done"]


# -- failing rollbacks --------------------------------------------------------------------


@both_modes
async def test_failing_compensation_halts_the_child_and_the_parent_still_rolls_back(
    make_coop: MakeCoop, listen: bool
) -> None:
    """ROLLBACK_FAILED stops the child's rollback; the parent compensates fully, then fails."""
    log: list[str] = []
    parent = Saga("parent")
    logged(parent, "prepare", log)
    add_step(parent, "delegate", log, launches="child", undo="undelegate")
    child = Saga("child")
    add_step(child, "c1", log, undo="never: rollback halted at c2")
    down = MyException("refund service down")
    add_step(child, "c2", log, undo="c2 compensation raises", undo_raises=down)
    add_step(child, "c3", raises=MyException("out of stock"))

    _, outcome, events = await run_to_end(
        make_coop(listen=listen), [("parent", parent), ("child", child)], "parent"
    )

    assert log == ["prepare", "c2 compensation raises", "undelegate", "unprepare"]
    assert of_saga(events, "child") == [
        ("SEEN", None),
        ("SUSPENDED", "c1"),
        ("SUSPENDED", "c2"),
        ("ROLLING_BACK", "c3"),
        ("SUSPENDED", "Rollback of c2 (rolling back child scopes)"),
        ("ROLLBACK_FAILED", "Rollback of c2"),
    ]
    assert describe(failure_of(events, "child", "ROLLBACK_FAILED")) == (
        'MyException("refund service down")'
    )
    assert of_saga(events, "parent") == [
        ("SEEN", None),
        ("SUSPENDED", "prepare"),
        ("EMITTED", "delegate"),
        ("SUSPENDED", "delegate"),
        ("ROLLING_BACK", "delegate"),
        ("ROLLBACK_EMITTED", "Rollback of delegate (rolling back child scopes)"),
        ("SUSPENDED", "Rollback of delegate (rolling back child scopes)"),
        ("SUSPENDED", "Rollback of delegate"),
        ("SUSPENDED", "Rollback of prepare (rolling back child scopes)"),
        ("SUSPENDED", "Rollback of prepare"),
        ("ROLLBACK_FAILED", "Rollback of prepare"),
    ]
    child_rollback = (
        'RollbackFailed(MyException("refund service down"), MyException("out of stock"))'
    )
    assert describe(failure_of(events, "parent", "ROLLING_BACK")) == (
        f"ChildRollbackFailed({child_rollback})"
    )
    assert outcome.status == "rollback_failed"
    # The child's rollback failure is reported once, inside the cause it belongs to.
    assert describe(outcome.failure) == f"RollbackFailed(ChildRollbackFailed({child_rollback}))"
    assert outcome.failure is not None
    assert outcome.failure.source == f"parent[{run_of(events, 'parent')}]"
    assert {(run.saga, run.status) for run in outcome.runs} == {("parent", "rollback_failed")}


@both_modes
async def test_a_childs_failed_rollback_does_not_stop_its_siblings_compensation(
    make_coop: MakeCoop, listen: bool
) -> None:
    """One child fails to roll back, one rolls back, one committed: the committed one is undone.

    (Scoop leaves the committed sibling uncompensated here; scoopy compensates what it can.)
    """
    log: list[str] = []
    parent = Saga("parent")
    add_step(parent, "fan_out", log, launches="work", undo="undo parent")
    sagas = []
    for name in ("committed", "unrevertable", "clean"):
        child = Saga(name)
        stuck = MyException("cannot revert") if name == "unrevertable" else None
        add_step(child, "one", log, undo=f"undo {name}", undo_raises=stuck)
        fails = None if name == "committed" else MyException(f"{name} failed")
        add_step(child, "two", raises=fails)
        sagas.append(child)

    _, outcome, events = await run_to_end(
        make_coop(listen=listen),
        [("parent", parent), *(("work", saga) for saga in sagas)],
        "parent",
    )

    assert outcome.status == "rollback_failed"
    assert sorted(log[:2]) == ["undo clean", "undo unrevertable"]
    assert log[2:] == ["undo committed", "undo parent"]
    unrevertable = (
        'RollbackFailed(MyException("cannot revert"), MyException("unrevertable failed"))'
    )
    seen_by_parent = (
        f'ChildRollbackFailed({unrevertable}, ChildRolledBack(MyException("clean failed")))'
    )
    assert describe(failure_of(events, "parent", "ROLLING_BACK")) == seen_by_parent
    # The child's rollback failure is reported once, inside the failure it caused.
    assert describe(outcome.failure) == f"RollbackFailed({seen_by_parent})"
    assert of_saga(events, "parent")[-1] == ("ROLLBACK_FAILED", "Rollback of fan_out")


@both_modes
@pytest.mark.parametrize("b_fate", ["commits", "rolls back"])
async def test_a_childs_rollback_failure_in_one_run_does_not_reach_another_run(
    make_coop: MakeCoop, listen: bool, b_fate: str
) -> None:
    """scoop-semantics §24.1 item 2: two runs A and B of the same saga, each with a child.
    A's child fails to compensate (ROLLBACK_FAILED) while B's child is still working; B then
    finishes as if A did not exist — it commits, or rolls back cleanly — and never hears of
    A's rollback failure."""
    log: list[str] = []
    b_child_working = anyio.Event()
    b_child_may_finish = anyio.Event()
    order = Saga("order")

    @order.step()
    async def delegate(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("fulfil", {"run": message.payload["run"]})

    @delegate.rollback
    async def undelegate(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append(f"undelegate {message.payload['run']}")

    @order.step()
    async def finish(scope: Scope, message: Message[Any]) -> None:
        log.append(f"finish {message.payload['run']}")
        if message.payload["fail"]:
            raise MyException(f"order {message.payload['run']} failed")

    fulfil = Saga("fulfil")

    @fulfil.step()
    async def ship(scope: Scope, message: Message[Any]) -> None:
        if message.payload["run"] == "B":
            b_child_working.set()
            await b_child_may_finish.wait()
        log.append(f"ship {message.payload['run']}")

    @ship.rollback
    async def unship(scope: Scope, message: Message[Any], f: BaseException) -> None:
        if message.payload["run"] == "A":
            raise MyException("carrier API down")
        log.append(f"unship {message.payload['run']}")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("orders", order)
        coop.subscribe("fulfil", fulfil)
        b = await coop.launch("orders", {"run": "B", "fail": b_fate == "rolls back"})
        with anyio.fail_after(WAIT):
            await b_child_working.wait()
        a = await coop.launch("orders", {"run": "A", "fail": True})
        a_outcome = await a.wait(timeout=WAIT)
        b_child_may_finish.set()
        b_outcome = await b.wait(timeout=WAIT)
        a_events, b_events = await coop.events(a.id), await coop.events(b.id)

    # A: its child's compensation failed, so A ends rollback_failed.
    assert a_outcome.status == "rollback_failed"
    assert "ROLLBACK_FAILED" in [e.type for e in a_events if e.saga == "fulfil"]
    # B: as if it ran alone.
    assert "ROLLBACK_FAILED" not in [e.type for e in b_events]
    assert all("RollbackFailed" not in e.failure.type for e in b_events if e.failure)
    if b_fate == "commits":
        assert b_outcome.status == "committed", b_outcome.failure
        assert b_outcome.failure is None
        assert [line for line in log if line.endswith("B")] == ["ship B", "finish B"]
    else:
        assert b_outcome.status == "rolled_back", b_outcome.failure
        assert describe(b_outcome.failure) == 'MyException("order B failed")'
        assert [line for line in log if line.endswith("B")] == [
            "ship B",
            "finish B",
            "unship B",
            "undelegate B",
        ]
    assert {(run.saga, run.status) for run in b_outcome.runs} == {
        ("order", "committed" if b_fate == "commits" else "rolled_back")
    }
