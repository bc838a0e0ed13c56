"""Failure semantics: rollbacks, distributed exceptions, child-failure handlers, cancellation,
undo, deadlines, try/finally, retries and crashes during compensations.

Every scenario runs on PostgreSQL. In-process orderings are recorded in a plain list (the
steps of all sagas run in this process); the event log is read with `coop.events`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import asyncpg
import msgspec
import pytest

from scoopy import (
    ABSOLUTE_DEADLINE,
    HAPPY_PATH_DEADLINE,
    ROLLBACK_DEADLINE,
    ChildRolledBack,
    Cooperation,
    CooperationError,
    CooperationFailure,
    Deadline,
    Event,
    GaveUp,
    Message,
    NextStep,
    RetryPolicy,
    Saga,
    ScoopyError,
    Scope,
    deadline,
)

from .helpers import RECHECK, WAIT, WorkerProcess, both_modes, eventually, logged, of_saga

MakeCoop = Callable[..., Cooperation]


class MyException(Exception):
    """A business failure raised by a step."""


class Flaky(Exception):
    """A failure worth retrying."""


class Fatal(Exception):
    """A failure not worth retrying."""


class PaymentAbandoned(Exception):
    """Raised by a child-failure handler that stops retrying."""


# -- helpers -------------------------------------------------------------------------------


async def wait_for_event(
    coop: Cooperation, root_id: uuid.UUID, match: Callable[[Event], bool]
) -> Event:
    """Wait until the hierarchy's event log holds a matching event, and return it."""
    found: list[Event] = []

    async def seen() -> bool:
        found[:] = [event for event in await coop.events(root_id) if match(event)]
        return bool(found)

    await eventually(seen)
    return found[0]


def describe(failure: CooperationFailure | None) -> str | None:
    """A failure tree in the notation of seed 003: `ChildRolledBack(RuntimeError("Geronimo!"))`.

    Leaves show their message; wrappers show their causes.
    """
    if failure is None:
        return None
    name = failure.type.rsplit(".", 1)[-1]
    if failure.causes:
        return f"{name}({', '.join(str(describe(cause)) for cause in failure.causes)})"
    return f'{name}("{failure.message}")'


def kinds(failure: CooperationFailure | None) -> list[str]:
    """The types of a failure and all its causes, depth first."""
    assert failure is not None
    return [each.type for each in failure.walk()]


def run_of(events: Sequence[Event], saga: str) -> uuid.UUID:
    """The run id of the (single) run of `saga` in the log."""
    found = {e.run_id for e in events if e.saga == saga and e.type == "SEEN"}
    assert len(found) == 1, found
    run = found.pop()
    assert run is not None
    return run


def failure_of(events: Sequence[Event], saga: str, kind: str) -> CooperationFailure:
    """The failure on the single event of type `kind` written by `saga`."""
    [failure] = [e.failure for e in events if e.saga == saga and e.type == kind]
    assert failure is not None
    return failure


def labelled(
    events: Sequence[Event], root_id: uuid.UUID
) -> list[tuple[str, str, str | None, str | None, str | None]]:
    """Rows shaped like the seed-003 tables: (message, type, saga, step, failure).

    Messages are labelled "root", then "child-1", "child-2"... in the order they were emitted.
    """
    labels = {root_id: "root"}
    for event in events:
        if event.type == "EMITTED" and event.message_id not in labels:
            assert event.message_id is not None
            labels[event.message_id] = f"child-{len(labels)}"
    rows = []
    for event in events:
        assert event.message_id is not None
        rows.append(
            (labels[event.message_id], event.type, event.saga, event.step, describe(event.failure))
        )
    return rows


# -- seed 001: distributed stack unwinding -------------------------------------------------


def three_level_sagas(log: list[str]) -> list[tuple[str, Saga]]:
    """Seed 001's 3-level example: the grandchild's second step throws; 1..9 in order."""
    parent = Saga("parent-handler")

    @parent.step("First parent step")
    async def parent_first(scope: Scope, message: Message[Any]) -> None:
        log.append("1")
        await scope.launch("child-topic", {})

    @parent_first.rollback
    async def parent_first_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("9")

    @parent.step("Second parent step")
    async def parent_second(scope: Scope, message: Message[Any]) -> None:
        log.append("This will never print")

    child = Saga("child-handler")

    @child.step("First child step")
    async def child_first(scope: Scope, message: Message[Any]) -> None:
        log.append("2")

    @child_first.rollback
    async def child_first_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("8")

    @child.step("Second child step")
    async def child_second(scope: Scope, message: Message[Any]) -> None:
        log.append("3")
        await scope.launch("grandchild-topic", {})

    @child_second.rollback
    async def child_second_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("7")

    grandchild = Saga("grandchild-handler")

    @grandchild.step("First grandchild step")
    async def grandchild_first(scope: Scope, message: Message[Any]) -> None:
        log.append("4")

    @grandchild_first.rollback
    async def grandchild_first_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("6")

    @grandchild.step("Second grandchild step")
    async def grandchild_second(scope: Scope, message: Message[Any]) -> None:
        log.append("5")
        raise MyException("My exception message")

    @grandchild_second.rollback
    async def grandchild_second_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("never: the step's transaction rolled back, nothing to compensate")

    return [("parent-topic", parent), ("child-topic", child), ("grandchild-topic", grandchild)]


@both_modes
async def test_seed001_three_levels_unwind_in_reverse(make_coop: MakeCoop, listen: bool) -> None:
    """Compensations run in exactly the reverse order of the steps, across three sagas."""
    log: list[str] = []
    async with make_coop(listen=listen) as coop:
        for topic, saga in three_level_sagas(log):
            coop.subscribe(topic, saga)
        outcome = await (await coop.launch("parent-topic", {})).wait(timeout=WAIT)

    assert outcome.status == "rolled_back"
    assert log == ["1", "2", "3", "4", "5", "6", "7", "8", "9"]


@both_modes
async def test_seed001_failing_sibling_rolls_back_first_then_the_others(
    make_coop: MakeCoop, listen: bool
) -> None:
    """Two parallel children: only the orders the seed guarantees are asserted."""
    log: list[str] = []
    parent = Saga("parent-handler")

    @parent.step("First parent step")
    async def parent_first(scope: Scope, message: Message[Any]) -> None:
        log.append("1")
        await scope.launch("child-topic", {})

    @parent_first.rollback
    async def parent_first_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("7")

    @parent.step("Second parent step")
    async def parent_second(scope: Scope, message: Message[Any]) -> None:
        log.append("This will never print")

    one = Saga("child-handler-1")

    @one.step("First child-1 step")
    async def one_first(scope: Scope, message: Message[Any]) -> None:
        log.append("2a")

    @one_first.rollback
    async def one_first_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("6")

    @one.step("Second child-1 step")
    async def one_second(scope: Scope, message: Message[Any]) -> None:
        log.append("3a")
        await scope.launch("grandchild-topic", {})

    @one_second.rollback
    async def one_second_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("5")

    two = Saga("child-handler-2")

    @two.step("First child-2 step")
    async def two_first(scope: Scope, message: Message[Any]) -> None:
        log.append("2b")

    @two_first.rollback
    async def two_first_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("4b")

    @two.step("Second child-2 step")
    async def two_second(scope: Scope, message: Message[Any]) -> None:
        log.append("3b")
        raise MyException("My exception message")

    @two_second.rollback
    async def two_second_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("never")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("parent-topic", parent)
        coop.subscribe("child-topic", one)
        coop.subscribe("child-topic", two)
        outcome = await (await coop.launch("parent-topic", {})).wait(timeout=WAIT)

    assert outcome.status == "rolled_back"
    assert log[0] == "1"
    assert sorted(log[1:6]) == sorted(["2a", "3a", "2b", "3b", "4b"])
    assert log[6:] == ["5", "6", "7"]
    middle = log[1:6]
    assert middle.index("2a") < middle.index("3a")
    assert middle.index("2b") < middle.index("3b") < middle.index("4b")


@both_modes
async def test_seed001_children_of_a_rolled_back_step_are_compensated_first(
    make_coop: MakeCoop, listen: bool
) -> None:
    """A later step of the parent fails: the committed child's compensations run before its own."""
    log: list[str] = []
    parent = Saga("parent-handler")

    @parent.step("First parent step")
    async def parent_first(scope: Scope, message: Message[Any]) -> None:
        log.append("1")
        await scope.launch("child-topic", {})

    @parent_first.rollback
    async def parent_first_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("7")

    @parent.step("Second parent step")
    async def parent_second(scope: Scope, message: Message[Any]) -> None:
        log.append("4")
        raise MyException("My exception message")

    @parent_second.rollback
    async def parent_second_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("never")

    child = Saga("child-handler")

    @child.step("First child step")
    async def child_first(scope: Scope, message: Message[Any]) -> None:
        log.append("2")

    @child_first.rollback
    async def child_first_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("6")

    @child.step("Second child step")
    async def child_second(scope: Scope, message: Message[Any]) -> None:
        log.append("3")

    @child_second.rollback
    async def child_second_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("5")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("parent-topic", parent)
        coop.subscribe("child-topic", child)
        outcome = await (await coop.launch("parent-topic", {})).wait(timeout=WAIT)

    assert outcome.status == "rolled_back"
    assert log == ["1", "2", "3", "4", "5", "6", "7"]


@both_modes
async def test_each_iteration_of_a_repeated_step_is_compensated_newest_first(
    make_coop: MakeCoop, listen: bool
) -> None:
    """A step run three times (REPEAT) is compensated three times, each with its iteration."""
    log: list[tuple[str, int]] = []
    saga = Saga("looper")

    @saga.step()
    async def collect(scope: Scope, message: Message[Any]) -> NextStep | None:
        log.append(("collect", scope.iteration))
        return NextStep.REPEAT if scope.iteration < 2 else None

    @collect.rollback
    async def uncollect(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append(("uncollect", scope.iteration))

    @saga.step()
    async def fail(scope: Scope, message: Message[Any]) -> None:
        raise MyException("after the loop")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("loop", saga)
        handle = await coop.launch("loop", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "rolled_back"
    assert log == [
        ("collect", 0),
        ("collect", 1),
        ("collect", 2),
        ("uncollect", 2),
        ("uncollect", 1),
        ("uncollect", 0),
    ]
    assert [(e.step, e.iteration) for e in events if e.phase == "compensation"] == [
        ("Rollback of collect", 2),
        ("Rollback of collect", 1),
        ("Rollback of collect", 0),
    ]


# -- seed 003: message-event tables of rollbacks ---------------------------------------------


@both_modes
async def test_seed003_failing_first_step_emits_nothing(make_coop: MakeCoop, listen: bool) -> None:
    """A step that launches and throws: its launch never happens; ROLLING_BACK then ROLLED_BACK."""
    root = Saga("root-handler")

    @root.step("0")
    async def step0(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("child-topic", {})
        raise RuntimeError("Geronimo!")

    child = Saga("child-handler")

    @child.step("0")
    async def child0(scope: Scope, message: Message[Any]) -> None:
        pass

    async with make_coop(listen=listen) as coop:
        coop.subscribe("root-topic", root)
        coop.subscribe("child-topic", child)
        handle = await coop.launch("root-topic", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "rolled_back"
    assert labelled(events, handle.id) == [
        ("root", "EMITTED", None, None, None),
        ("root", "SEEN", "root-handler", None, None),
        ("root", "ROLLING_BACK", "root-handler", "0", 'RuntimeError("Geronimo!")'),
        ("root", "ROLLED_BACK", "root-handler", "Rollback of 0", None),
    ]


@both_modes
async def test_seed003_failing_compensation_is_rollback_failed(
    make_coop: MakeCoop, listen: bool
) -> None:
    """Step 1 throws; step 0's compensation throws: ROLLBACK_FAILED on `Rollback of 0`."""
    root = Saga("root-handler")

    @root.step("0")
    async def step0(scope: Scope, message: Message[Any]) -> None:
        pass

    @step0.rollback
    async def step0_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        raise ValueError("Geronimo again!")

    @root.step("1")
    async def step1(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("child-topic", {})
        raise RuntimeError("Geronimo!")

    child = Saga("child-handler")

    @child.step("0")
    async def child0(scope: Scope, message: Message[Any]) -> None:
        pass

    async with make_coop(listen=listen) as coop:
        coop.subscribe("root-topic", root)
        coop.subscribe("child-topic", child)
        handle = await coop.launch("root-topic", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "rollback_failed"
    assert labelled(events, handle.id) == [
        ("root", "EMITTED", None, None, None),
        ("root", "SEEN", "root-handler", None, None),
        ("root", "SUSPENDED", "root-handler", "0", None),
        ("root", "ROLLING_BACK", "root-handler", "1", 'RuntimeError("Geronimo!")'),
        ("root", "SUSPENDED", "root-handler", "Rollback of 0 (rolling back child scopes)", None),
        (
            "root",
            "ROLLBACK_FAILED",
            "root-handler",
            "Rollback of 0",
            'ValueError("Geronimo again!")',
        ),
    ]


@both_modes
async def test_seed003_failing_child_rolls_back_then_its_parent(
    make_coop: MakeCoop, listen: bool
) -> None:
    """The child's rollback completes first; the parent then rolls its child scopes back."""
    root = Saga("root-handler")

    @root.step("0")
    async def step0(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("child-topic", {})

    child = Saga("child-handler")

    @child.step("0")
    async def child0(scope: Scope, message: Message[Any]) -> None:
        pass

    @child.step("1")
    async def child1(scope: Scope, message: Message[Any]) -> None:
        raise RuntimeError("Geronimo!")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("root-topic", root)
        coop.subscribe("child-topic", child)
        handle = await coop.launch("root-topic", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "rolled_back"
    children = "Rollback of 0 (rolling back child scopes)"
    geronimo = 'RuntimeError("Geronimo!")'
    assert labelled(events, handle.id) == [
        ("root", "EMITTED", None, None, None),
        ("root", "SEEN", "root-handler", None, None),
        ("child-1", "EMITTED", "root-handler", "0", None),
        ("root", "SUSPENDED", "root-handler", "0", None),
        ("child-1", "SEEN", "child-handler", None, None),
        ("child-1", "SUSPENDED", "child-handler", "0", None),
        ("child-1", "ROLLING_BACK", "child-handler", "1", geronimo),
        ("child-1", "SUSPENDED", "child-handler", children, None),
        ("child-1", "SUSPENDED", "child-handler", "Rollback of 0", None),
        ("child-1", "ROLLED_BACK", "child-handler", "Rollback of 0", None),
        ("root", "ROLLING_BACK", "root-handler", "0", f"ChildRolledBack({geronimo})"),
        (
            "child-1",
            "ROLLBACK_EMITTED",
            "root-handler",
            children,
            f"ParentSaidSo(ChildRolledBack({geronimo}))",
        ),
        ("root", "SUSPENDED", "root-handler", children, None),
        ("root", "SUSPENDED", "root-handler", "Rollback of 0", None),
        ("root", "ROLLED_BACK", "root-handler", "Rollback of 0", None),
    ]


# -- distributed exceptions ----------------------------------------------------------------


@both_modes
async def test_failure_nests_per_level_with_sources_and_round_trips_as_json(
    make_coop: MakeCoop, listen: bool
) -> None:
    """Grandchild failure inside the child's ChildRolledBack inside the parent's; JSON is stable."""
    log: list[str] = []
    async with make_coop(listen=listen) as coop:
        for topic, saga in three_level_sagas(log):
            coop.subscribe(topic, saga)
        handle = await coop.launch("parent-topic", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

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
        frame.function == "grandchild_second" and frame.file.endswith("test_failures.py")
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

    @parent.step("notify all")
    async def notify_all(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("notify", {})

    sagas: list[Saga] = []
    for name, error in (("email", "smtp down"), ("sms", "no signal")):
        failing = Saga(name)

        @failing.step("send")
        async def send(scope: Scope, message: Message[Any], error: str = error) -> None:
            raise MyException(error)

        sagas.append(failing)
    push = Saga("push")

    @push.step("send")
    async def push_send(scope: Scope, message: Message[Any]) -> None:
        log.append("pushed")

    @push_send.rollback
    async def unpush(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("unpushed")

    sagas.append(push)

    async with make_coop(listen=listen) as coop:
        coop.subscribe("notifier", parent)
        for saga in sagas:
            coop.subscribe("notify", saga)
        handle = await coop.launch("notifier", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

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

    @parent.step("fan out")
    async def fan_out(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("work", {})

    @fan_out.rollback
    async def fan_out_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("undo fan out")

    @parent.step("fail")
    async def fail(scope: Scope, message: Message[Any]) -> None:
        raise MyException("parent failed")

    sagas = []
    for name in ("x", "y"):
        child = Saga(name)

        @child.step("do")
        async def do(scope: Scope, message: Message[Any]) -> None:
            pass

        @do.rollback
        async def undo(scope: Scope, message: Message[Any], f: BaseException) -> None:
            raise MyException(f"cannot undo {scope.saga}")

        sagas.append(child)

    async with make_coop(listen=listen) as coop:
        coop.subscribe("parent", parent)
        for saga in sagas:
            coop.subscribe("work", saga)
        handle = await coop.launch("parent", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

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


# -- on_child_failure ----------------------------------------------------------------------


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

    @order.step()
    async def ship(scope: Scope, message: Message[Any]) -> None:
        log.append("ship")

    payment = Saga("payment")

    @payment.step()
    async def charge(scope: Scope, message: Message[Any]) -> None:
        log.append(f"charge {message.payload['try']}")
        if message.payload["try"] == 0:
            raise MyException("card declined")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("order", order)
        coop.subscribe("payment", payment)
        handle = await coop.launch("order", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

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

    @order.step()
    async def place(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("payment", {})

    @place.rollback
    async def unplace(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("unplace")

    @place.on_child_failure
    async def retry_payment(
        scope: Scope, message: Message[Any], failure: CooperationError
    ) -> NextStep | None:
        iterations.append(scope.handler_iteration)
        if scope.handler_iteration is not None and scope.handler_iteration >= 2:
            raise PaymentAbandoned("three declines") from failure
        await scope.launch("payment", {})
        return None

    @order.step()
    async def ship(scope: Scope, message: Message[Any]) -> None:
        log.append("never shipped")

    payment = Saga("payment")

    @payment.step()
    async def charge(scope: Scope, message: Message[Any]) -> None:
        log.append("declined")
        raise MyException("card declined")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("order", order)
        coop.subscribe("payment", payment)
        handle = await coop.launch("order", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "rolled_back"
    assert iterations == [0, 1, 2]
    assert log == ["declined", "declined", "declined", "unplace"]
    failure = outcome.failure
    assert failure is not None
    assert failure.type == f"{PaymentAbandoned.__module__}.PaymentAbandoned"
    assert kinds(failure)[1:] == ["scoopy.ChildRolledBack", f"{MyException.__module__}.MyException"]
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

    @saga.step()
    async def optional(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("enrich", {})

    @optional.on_child_failure
    async def ignore(
        scope: Scope, message: Message[Any], failure: CooperationError
    ) -> NextStep | None:
        calls.append(scope.handler_iteration)
        return None

    @saga.step()
    async def required(scope: Scope, message: Message[Any]) -> None:
        log.append("required")
        await scope.launch("store", {})

    @saga.step()
    async def done(scope: Scope, message: Message[Any]) -> None:
        log.append("done")

    enrich = Saga("enrich")

    @enrich.step()
    async def enrich_it(scope: Scope, message: Message[Any]) -> None:
        raise MyException("enrichment unavailable")

    store = Saga("store")

    @store.step()
    async def store_it(scope: Scope, message: Message[Any]) -> None:
        log.append("stored")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("importer", saga)
        coop.subscribe("enrich", enrich)
        coop.subscribe("store", store)
        outcome = await (await coop.launch("importer", {})).wait(timeout=WAIT)

    assert outcome.status == "committed", outcome.failure
    assert calls == [0]
    assert log == ["required", "stored", "done"]


# -- failing rollbacks ---------------------------------------------------------------------


@both_modes
async def test_failing_compensation_halts_the_child_and_the_parent_still_rolls_back(
    make_coop: MakeCoop, listen: bool
) -> None:
    """ROLLBACK_FAILED stops the child's rollback; the parent compensates fully, then fails."""
    log: list[str] = []
    parent = Saga("parent")

    logged(parent, "prepare", log)

    @parent.step()
    async def delegate(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("child", {})

    @delegate.rollback
    async def undelegate(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("undelegate")

    child = Saga("child")

    @child.step()
    async def c1(scope: Scope, message: Message[Any]) -> None:
        pass

    @c1.rollback
    async def c1_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("never: rollback halted at c2")

    @child.step()
    async def c2(scope: Scope, message: Message[Any]) -> None:
        pass

    @c2.rollback
    async def c2_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("c2 compensation raises")
        raise MyException("refund service down")

    @child.step()
    async def c3(scope: Scope, message: Message[Any]) -> None:
        raise MyException("out of stock")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("parent", parent)
        coop.subscribe("child", child)
        handle = await coop.launch("parent", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

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

    @parent.step()
    async def fan_out(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("work", {})

    @fan_out.rollback
    async def fan_out_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("undo parent")

    sagas = []
    for name in ("committed", "unrevertable", "clean"):
        child = Saga(name)

        @child.step("one")
        async def one(scope: Scope, message: Message[Any]) -> None:
            pass

        @one.rollback
        async def undo_one(scope: Scope, message: Message[Any], f: BaseException) -> None:
            log.append(f"undo {scope.saga}")
            if scope.saga == "unrevertable":
                raise MyException("cannot revert")

        @child.step("two")
        async def two(scope: Scope, message: Message[Any]) -> None:
            if scope.saga != "committed":
                raise MyException(f"{scope.saga} failed")

        sagas.append(child)

    async with make_coop(listen=listen) as coop:
        coop.subscribe("parent", parent)
        for saga in sagas:
            coop.subscribe("work", saga)
        handle = await coop.launch("parent", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

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


# -- cancellation --------------------------------------------------------------------------


def waiting_hierarchy(log: list[str]) -> list[tuple[str, Saga]]:
    """parent -> child -> grandchild, the grandchild durably asleep in its first step."""
    parent = Saga("parent")

    @parent.step()
    async def order(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("child", {})

    @order.rollback
    async def unorder(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("undo parent")

    child = Saga("child")

    @child.step()
    async def pack(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("grandchild", {})

    @pack.rollback
    async def unpack(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("undo child")

    grandchild = Saga("grandchild")

    @grandchild.step()
    async def hold(scope: Scope, message: Message[Any]) -> None:
        await scope.sleep(3600)

    @hold.rollback
    async def unhold(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("undo grandchild")

    @grandchild.step()
    async def ship(scope: Scope, message: Message[Any]) -> None:
        log.append("never shipped")

    return [("parent", parent), ("child", child), ("grandchild", grandchild)]


def is_asleep(event: Event) -> bool:
    return event.saga == "grandchild" and event.type == "SUSPENDED" and event.step == "hold"


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
    assert kinds(grand) == ["scoopy.GaveUp", "scoopy.CancellationRequested"]
    assert outcome.failure is not None
    assert outcome.failure.type == "scoopy.GaveUp"
    assert "scoopy.CancellationRequested" in kinds(outcome.failure)
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

    @parent.step()
    async def fan_out(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("children", {})

    @fan_out.on_child_failure
    async def tolerate(
        scope: Scope, message: Message[Any], failure: CooperationError
    ) -> NextStep | None:
        seen_by_handler.append([f.message for f in failure.failure.walk()])
        return None

    @parent.step()
    async def after(scope: Scope, message: Message[Any]) -> None:
        log.append("parent continues")

    slow = Saga("slow-child")

    @slow.step()
    async def start(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("grandchild", {})

    @start.rollback
    async def unstart(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("undo slow-child")

    fast = Saga("fast-child")

    @fast.step()
    async def quick(scope: Scope, message: Message[Any]) -> None:
        log.append("fast-child done")

    @quick.rollback
    async def unquick(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("never: sibling not cancelled")

    grandchild = Saga("grandchild")

    @grandchild.step()
    async def hold(scope: Scope, message: Message[Any]) -> None:
        await scope.sleep(3600)

    @hold.rollback
    async def unhold(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("undo grandchild")

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

    @parent.step()
    async def order(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("child", {})

    @order.rollback
    async def unorder(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("undo parent")

    child = Saga("child")

    @child.step()
    async def pack(scope: Scope, message: Message[Any]) -> None:
        log.append("never: skipped")

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

    @saga.step()
    async def debit(scope: Scope, message: Message[Any]) -> None:
        pass

    @debit.rollback
    async def undebit(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("undebit")

    @saga.step()
    async def hold(scope: Scope, message: Message[Any]) -> None:
        pass

    @hold.rollback
    async def unhold(scope: Scope, message: Message[Any], f: BaseException) -> None:
        compensating.set()
        await proceed.wait()
        log.append("unhold")

    @saga.step()
    async def credit(scope: Scope, message: Message[Any]) -> None:
        raise MyException("account closed")

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


# -- undo ----------------------------------------------------------------------------------


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

    @failing.step()
    async def broken(scope: Scope, message: Message[Any]) -> None:
        raise MyException("nope")

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


def undo_target(log: list[str]) -> list[tuple[str, Saga]]:
    """root -> {a, b} on one message -> a's and b's own grandchildren; all compensations log."""
    root = Saga("root")

    @root.step()
    async def fan_out(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("kids", {})

    @fan_out.rollback
    async def fan_in(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("undo root")

    sagas: list[tuple[str, Saga]] = [("root", root)]
    for name in ("a", "b"):
        child = Saga(name)

        @child.step()
        async def delegate(scope: Scope, message: Message[Any]) -> None:
            await scope.launch(f"{scope.saga}-grand", {})

        @delegate.rollback
        async def undelegate(scope: Scope, message: Message[Any], f: BaseException) -> None:
            log.append(f"undo {scope.saga}: {type(f).__name__}")

        grand = Saga(f"{name}-grand")

        @grand.step()
        async def work(scope: Scope, message: Message[Any]) -> None:
            pass

        @work.rollback
        async def unwork(scope: Scope, message: Message[Any], f: BaseException) -> None:
            log.append(f"undo {scope.saga}: {type(f).__name__}")

        sagas += [("kids", child), (f"{name}-grand", grand)]
    return sagas


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


# -- deadlines -----------------------------------------------------------------------------


@both_modes
async def test_happy_path_deadline_missed_while_waiting_for_a_slow_child(
    make_coop: MakeCoop, listen: bool
) -> None:
    """The child sleeps past the inherited deadline: both give up; the failure names it."""
    log: list[str] = []
    checkout = Saga("checkout")

    @checkout.step()
    async def reserve(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("stock", {})

    @reserve.rollback
    async def unreserve(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("undo checkout")

    stock = Saga("stock")

    @stock.step()
    async def backorder(scope: Scope, message: Message[Any]) -> None:
        await scope.sleep(3600)

    @backorder.rollback
    async def unbackorder(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("undo stock")

    @stock.step()
    async def deliver(scope: Scope, message: Message[Any]) -> None:
        log.append("never delivered")

    limit = deadline(0.6, "checkout-sla")
    async with make_coop(listen=listen) as coop:
        coop.subscribe("checkout", checkout)
        coop.subscribe("stock", stock)
        handle = await coop.launch("checkout", {}, context={HAPPY_PATH_DEADLINE: limit})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

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
    assert kinds(failure)[2:4] == ["scoopy.ChildRolledBack", "scoopy.GaveUp"]
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

    @saga.step()
    async def first(scope: Scope, message: Message[Any]) -> None:
        pass

    @first.rollback
    async def first_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("never: rollback deadline passed")

    @saga.step()
    async def second(scope: Scope, message: Message[Any]) -> None:
        pass

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

    async with make_coop(listen=listen) as coop:
        coop.subscribe("refund", saga)
        handle = await coop.launch("refund", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

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

    @saga.step()
    async def load(scope: Scope, message: Message[Any]) -> None:
        pass

    @load.rollback
    async def unload(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("never: absolute deadline passed")

    @saga.step()
    async def transform(scope: Scope, message: Message[Any]) -> None:
        limit = scope.context[ABSOLUTE_DEADLINE]
        await anyio.sleep((limit.at - scope.now()).total_seconds() + 0.05)

    @transform.rollback
    async def untransform(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("never: absolute deadline passed")

    @saga.step()
    async def publish(scope: Scope, message: Message[Any]) -> None:
        log.append("never published")

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

    @child.step()
    async def never(scope: Scope, message: Message[Any]) -> None:
        pass

    limit = deadline(0.5, "root")
    async with make_coop(listen=listen) as coop:
        coop.subscribe("parent", parent)
        coop.subscribe("child", child)
        handle = await coop.launch("parent", {}, context={HAPPY_PATH_DEADLINE: limit})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

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

    @parent.step()
    async def proceed(scope: Scope, message: Message[Any]) -> None:
        seen.append("proceed")

    supplier = Saga("supplier")

    @supplier.step()
    async def wait_for_quote(scope: Scope, message: Message[Any]) -> None:
        await scope.sleep(3600)

    @supplier.step()
    async def answer(scope: Scope, message: Message[Any]) -> None:
        seen.append("never answered")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("parent", parent)
        coop.subscribe("supplier", supplier)
        limit = deadline(60, "root")
        handle = await coop.launch("parent", {}, context={HAPPY_PATH_DEADLINE: limit})
        outcome = await handle.wait(timeout=WAIT)

    assert outcome.status == "committed", outcome.failure
    # The child missed "quote"; the parent still runs under its own, looser "root" deadline.
    assert seen == ["quote", "root", "proceed"]


# -- try/finally ---------------------------------------------------------------------------


def provisioning(log: list[str], *, child_fails: bool, later_fails: bool) -> list[tuple[str, Saga]]:
    """Seed 001's resource example: spin up, launch the calculation, spin down in `finally_`."""
    root = Saga("root-handler")

    @root.step()
    async def provision(scope: Scope, message: Message[Any]) -> None:
        log.append("spin up")
        await scope.launch("calculate", {})

    @provision.finally_
    async def spin_down(scope: Scope, message: Message[Any]) -> None:
        log.append("spin down")

    @provision.rollback
    async def unprovision(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("undo provision")

    @root.step()
    async def report(scope: Scope, message: Message[Any]) -> None:
        log.append("report")
        if later_fails:
            raise MyException("report failed")

    calculation = Saga("calculation")

    @calculation.step()
    async def calculate(scope: Scope, message: Message[Any]) -> None:
        log.append("calculate")
        if child_fails:
            raise MyException("calculation failed")

    @calculate.rollback
    async def uncalculate(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("undo calculate")

    return [("root", root), ("calculate", calculation)]


@both_modes
async def test_finally_runs_once_after_children_succeed(make_coop: MakeCoop, listen: bool) -> None:
    """Children commit: `finally_` runs once, after them and before the next step."""
    log: list[str] = []
    async with make_coop(listen=listen) as coop:
        for topic, saga in provisioning(log, child_fails=False, later_fails=False):
            coop.subscribe(topic, saga)
        handle = await coop.launch("root", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "committed", outcome.failure
    assert log == ["spin up", "calculate", "spin down", "report"]
    assert of_saga(events, "root-handler") == [
        ("SEEN", None),
        ("EMITTED", "provision"),
        ("SUSPENDED", "provision"),
        ("SUSPENDED", "provision (finally)"),
        ("SUSPENDED", "report"),
        ("COMMITTED", "report"),
    ]


@both_modes
async def test_finally_runs_once_during_rollback_when_a_child_fails(
    make_coop: MakeCoop, listen: bool
) -> None:
    """A child fails: `finally_` runs once, after the child rolled back, before the compensation."""
    log: list[str] = []
    async with make_coop(listen=listen) as coop:
        for topic, saga in provisioning(log, child_fails=True, later_fails=False):
            coop.subscribe(topic, saga)
        outcome = await (await coop.launch("root", {})).wait(timeout=WAIT)

    assert outcome.status == "rolled_back"
    assert log == ["spin up", "calculate", "spin down", "undo provision"]


@both_modes
async def test_finally_is_not_run_again_when_a_later_step_fails(
    make_coop: MakeCoop, listen: bool
) -> None:
    """`finally_` ran after the children; a later failure's rollback does not run it again."""
    log: list[str] = []
    async with make_coop(listen=listen) as coop:
        for topic, saga in provisioning(log, child_fails=False, later_fails=True):
            coop.subscribe(topic, saga)
        outcome = await (await coop.launch("root", {})).wait(timeout=WAIT)

    assert outcome.status == "rolled_back"
    assert log == [
        "spin up",
        "calculate",
        "spin down",
        "report",
        "undo calculate",
        "undo provision",
    ]


# -- retries -------------------------------------------------------------------------------


@both_modes
async def test_retried_step_succeeds_on_its_third_attempt(
    make_coop: MakeCoop, db: asyncpg.Connection[asyncpg.Record], listen: bool
) -> None:
    """Two ATTEMPT_FAILED, then the step commits; failed attempts' writes vanish."""
    await db.execute("CREATE TABLE attempt (n int)")
    attempts: list[int] = []
    saga = Saga("importer")

    @saga.step(retry=RetryPolicy(attempts=3, backoff=0.05, jitter=0))
    async def fetch(scope: Scope, message: Message[Any]) -> None:
        attempts.append(scope.attempt)
        await scope.connection.execute(
            f'INSERT INTO "{scope_schema}".attempt VALUES ($1)', scope.attempt
        )
        if scope.attempt < 3:
            raise Flaky(f"attempt {scope.attempt}")

    async with make_coop(listen=listen) as coop:
        scope_schema = coop.schema
        coop.subscribe("import", saga)
        handle = await coop.launch("import", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "committed", outcome.failure
    assert attempts == [1, 2, 3]
    assert [r["n"] for r in await db.fetch("SELECT n FROM attempt")] == [3]
    assert of_saga(events, "importer") == [
        ("SEEN", None),
        ("ATTEMPT_FAILED", "fetch"),
        ("ATTEMPT_FAILED", "fetch"),
        ("SUSPENDED", "fetch"),
        ("COMMITTED", "fetch"),
    ]
    failed = [describe(e.failure) for e in events if e.type == "ATTEMPT_FAILED"]
    assert failed == ['Flaky("attempt 1")', 'Flaky("attempt 2")']


@both_modes
async def test_exhausted_retries_report_every_attempt_and_roll_back(
    make_coop: MakeCoop, listen: bool
) -> None:
    """After the last attempt: RetriesExhausted with each attempt's failure, then rollback."""
    log: list[str] = []
    saga = Saga("importer")

    @saga.step()
    async def book(scope: Scope, message: Message[Any]) -> None:
        pass

    @book.rollback
    async def unbook(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append(f"unbook: {type(f).__name__}")

    @saga.step(retry=RetryPolicy(attempts=3, backoff=0.05, jitter=0))
    async def fetch(scope: Scope, message: Message[Any]) -> None:
        log.append(f"attempt {scope.attempt}")
        raise Flaky(f"attempt {scope.attempt}")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("import", saga)
        handle = await coop.launch("import", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "rolled_back"
    assert log == ["attempt 1", "attempt 2", "attempt 3", "unbook: RetriesExhausted"]
    failure = outcome.failure
    assert failure is not None
    assert describe(failure) == (
        'RetriesExhausted(Flaky("attempt 1"), Flaky("attempt 2"), Flaky("attempt 3"))'
    )
    assert failure.message == "step 'fetch' failed after 3 attempts"
    assert of_saga(events, "importer") == [
        ("SEEN", None),
        ("SUSPENDED", "book"),
        ("ATTEMPT_FAILED", "fetch"),
        ("ATTEMPT_FAILED", "fetch"),
        ("ROLLING_BACK", "fetch"),
        ("SUSPENDED", "Rollback of book (rolling back child scopes)"),
        ("SUSPENDED", "Rollback of book"),
        ("ROLLED_BACK", "Rollback of book"),
    ]
    assert failure_of(events, "importer", "ROLLING_BACK") == failure


@both_modes
async def test_exception_outside_the_retry_policy_is_not_retried(
    make_coop: MakeCoop, listen: bool
) -> None:
    """Only exceptions listed in `on` are retried; others roll back on the first attempt."""
    attempts: list[int] = []
    saga = Saga("importer")

    @saga.step(retry=RetryPolicy(attempts=3, backoff=0.05, jitter=0, on=(Flaky,)))
    async def fetch(scope: Scope, message: Message[Any]) -> None:
        attempts.append(scope.attempt)
        raise Fatal("malformed input")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("import", saga)
        handle = await coop.launch("import", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "rolled_back"
    assert attempts == [1]
    assert describe(outcome.failure) == 'Fatal("malformed input")'
    assert "ATTEMPT_FAILED" not in [e.type for e in events]


@both_modes
async def test_cancellation_during_a_retry_backoff_stops_the_retries(
    make_coop: MakeCoop, listen: bool
) -> None:
    """A step waiting out its backoff gives up when cancelled instead of trying again."""
    attempts: list[int] = []
    saga = Saga("importer")

    @saga.step(retry=RetryPolicy(attempts=5, backoff=60, jitter=0))
    async def fetch(scope: Scope, message: Message[Any]) -> None:
        attempts.append(scope.attempt)
        raise Flaky("upstream down")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("import", saga)
        handle = await coop.launch("import", {})
        await wait_for_event(coop, handle.id, lambda e: e.type == "ATTEMPT_FAILED")
        await coop.cancel(handle.id, "stop trying")
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "rolled_back"
    assert attempts == [1]
    assert describe(outcome.failure) == 'GaveUp(CancellationRequested("stop trying"))'
    assert of_saga(events, "importer") == [
        ("SEEN", None),
        ("ATTEMPT_FAILED", "fetch"),
        ("ROLLING_BACK", "fetch"),
        ("ROLLED_BACK", "Rollback of fetch"),
    ]


# -- crashes -------------------------------------------------------------------------------


async def test_worker_killed_during_a_compensation_finishes_it_elsewhere_exactly_once(
    dsn: str,
    schema: str,
    make_coop: MakeCoop,
    db: asyncpg.Connection[asyncpg.Record],
) -> None:
    """SIGKILL mid-compensation: another worker reruns it (at least once); its write, once."""
    app = "tests.apps.compensations:setup"
    await db.execute("CREATE TABLE ledger (run_id uuid, what text, pid int)")
    compensating: list[str] = []
    signalled = anyio.Event()

    def on_notify(*args: object) -> None:
        compensating.append(str(args[-1]))
        signalled.set()

    await db.add_listener(f"{schema}_compensating", on_notify)
    async with make_coop(worker=False) as coop:
        async with WorkerProcess(dsn, schema, app, HANG_IN_COMPENSATION="1") as doomed:
            handle = await coop.launch("bookings", {})
            with anyio.fail_after(WAIT):
                await signalled.wait()
            await doomed.kill()
        async with WorkerProcess(dsn, schema, app) as survivor:
            outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "rolled_back", outcome.failure
    assert describe(outcome.failure) == 'CardDeclined("card declined")'
    # The compensation started in the killed worker (at least once) ...
    assert compensating == [str(doomed.pid)]
    # ... but only the survivor's run of it committed its business write (exactly once).
    rows = [(r["what"], r["pid"]) for r in await db.fetch("SELECT what, pid FROM ledger")]
    assert sorted(rows) == sorted([("reserved", doomed.pid), ("released", survivor.pid)])
    assert of_saga(events, "booking") == [
        ("SEEN", None),
        ("SUSPENDED", "reserve"),
        ("ROLLING_BACK", "charge"),
        ("SUSPENDED", "Rollback of reserve (rolling back child scopes)"),
        ("SUSPENDED", "Rollback of reserve"),
        ("ROLLED_BACK", "Rollback of reserve"),
    ]
    # Who wrote what: the doomed worker got as far as the child-scope sub-step; the survivor
    # ran the compensation again and finished the rollback.
    # (Worker ids read "<host>/<pid>/<suffix>".)
    writers = [
        (e.type, e.step, int(str(e.worker).rsplit("/", 2)[1]))
        for e in events
        if e.saga == "booking" and e.type != "SEEN"
    ]
    assert writers == [
        ("SUSPENDED", "reserve", doomed.pid),
        ("ROLLING_BACK", "charge", doomed.pid),
        ("SUSPENDED", "Rollback of reserve (rolling back child scopes)", doomed.pid),
        ("SUSPENDED", "Rollback of reserve", survivor.pid),
        ("ROLLED_BACK", "Rollback of reserve", survivor.pid),
    ]


@both_modes
async def test_a_failure_after_retried_attempts_lists_every_attempt(
    make_coop: MakeCoop, listen: bool
) -> None:
    """An attempt that raises something the policy does not retry ends the retries, and the
    failure still records the earlier, retried attempts."""
    saga = Saga("importer")

    @saga.step(retry=RetryPolicy(attempts=3, backoff=0.05, jitter=0, on=(Flaky,)))
    async def fetch(scope: Scope, message: Message[Any]) -> None:
        if scope.attempt == 1:
            raise Flaky("timeout")
        raise Fatal("malformed input")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("import", saga)
        outcome = await (await coop.launch("import", {})).wait(timeout=WAIT)

    assert outcome.status == "rolled_back"
    assert (
        describe(outcome.failure) == 'RetriesExhausted(Flaky("timeout"), Fatal("malformed input"))'
    )


@both_modes
async def test_undo_after_a_happy_path_deadline_passed_is_judged_by_the_rollback_path(
    make_coop: MakeCoop, db: asyncpg.Connection[asyncpg.Record], listen: bool
) -> None:
    """A hierarchy that committed within its happy-path deadline can be undone after that
    deadline: compensations asking `give_up_if_needed()` are on the rollback path."""
    undone: list[str] = []
    saga = Saga("booking")

    @saga.step()
    async def book(scope: Scope, message: Message[Any]) -> None:
        pass

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


# -- more: deadlines inside a step, retries across restarts, finally, cross-run isolation --


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

    @saga.step()
    async def publish(scope: Scope, message: Message[Any]) -> None:
        log.append("never: published")

    limit = deadline(1.0, "report-sla")
    async with make_coop(listen=listen) as coop:
        coop.subscribe("report", saga)
        handle = await coop.launch("report", {}, context={HAPPY_PATH_DEADLINE: limit})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

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


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_a_retry_backoff_survives_a_worker_restart(
    dsn: str,
    schema: str,
    make_coop: MakeCoop,
    db: asyncpg.Connection[asyncpg.Record],
    stop: str,
) -> None:
    """The first attempt fails and the worker process stops during the backoff; a new worker
    runs the second attempt once the backoff is over: the step ran exactly twice (once per
    worker) and the hierarchy commits."""
    from .apps.retrying import BACKOFF

    app = "tests.apps.retrying:setup"
    await db.execute("CREATE TABLE attempts (run_id uuid, attempt int, pid int, at timestamptz)")
    async with make_coop(worker=False) as coop:
        async with WorkerProcess(dsn, schema, app) as first:
            handle = await coop.launch("sync", {})
            await wait_for_event(coop, handle.id, lambda e: e.type == "ATTEMPT_FAILED")
            if stop == "sigkill":
                await first.kill()
            # else: leaving the block sends SIGTERM and waits for a clean exit
        stopped_at = await db.fetchval("SELECT clock_timestamp()")
        assert first.process is not None
        assert first.process.returncode == (0 if stop == "sigterm" else -9)
        async with WorkerProcess(dsn, schema, app) as second:
            outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "committed", outcome.failure
    rows = await db.fetch("SELECT attempt, pid, at FROM attempts ORDER BY attempt")
    assert [(r["attempt"], r["pid"]) for r in rows] == [(1, first.pid), (2, second.pid)]
    first_try, second_try = (r["at"] for r in rows)
    assert (stopped_at - first_try).total_seconds() < BACKOFF  # stopped during the backoff
    assert (second_try - first_try).total_seconds() >= BACKOFF  # and the backoff was kept
    assert of_saga(events, "sync") == [
        ("SEEN", None),
        ("ATTEMPT_FAILED", "call_partner"),
        ("SUSPENDED", "call_partner"),
        ("COMMITTED", "call_partner"),
    ]
    [failed] = [e for e in events if e.type == "ATTEMPT_FAILED"]
    assert describe(failed.failure) == 'PartnerTimeout("partner API timed out")'
    writers = {e.type: int(str(e.worker).rsplit("/", 2)[1]) for e in events if e.saga == "sync"}
    assert writers["ATTEMPT_FAILED"] == first.pid
    assert writers["COMMITTED"] == second.pid


@both_modes
async def test_finally_runs_once_when_the_step_itself_raises(
    make_coop: MakeCoop, listen: bool
) -> None:
    """A `finally_` step whose body launches a child and then raises: the finally action runs
    exactly once, the child never starts (its message went with the doomed transaction), the
    run rolls back compensating only the earlier step, and no "(finally)" step runs later."""
    log: list[str] = []
    job = Saga("big-computation")

    logged(job, "book", log)

    @job.step()
    async def spin_up(scope: Scope, message: Message[Any]) -> None:
        log.append("spin up")
        await scope.launch("calculate", {})
        raise MyException("no capacity")

    @spin_up.finally_
    async def spin_down(scope: Scope, message: Message[Any]) -> None:
        log.append("spin down")

    @spin_up.rollback
    async def unspin(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("never: the failing step committed nothing to compensate")

    @job.step()
    async def report(scope: Scope, message: Message[Any]) -> None:
        log.append("never: report")

    calculation = Saga("calculation")

    @calculation.step()
    async def calculate(scope: Scope, message: Message[Any]) -> None:
        log.append("never: calculate")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("jobs", job)
        coop.subscribe("calculate", calculation)
        handle = await coop.launch("jobs", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "rolled_back"
    assert log == ["book", "spin up", "spin down", "unbook"]
    assert describe(outcome.failure) == 'MyException("no capacity")'
    assert of_saga(events, "big-computation") == [
        ("SEEN", None),
        ("SUSPENDED", "book"),
        ("ROLLING_BACK", "spin_up"),
        ("SUSPENDED", "Rollback of book (rolling back child scopes)"),
        ("SUSPENDED", "Rollback of book"),
        ("ROLLED_BACK", "Rollback of book"),
    ]
    assert {e.saga for e in events} == {None, "big-computation"}  # no calculation run
    assert [run.saga for run in outcome.runs] == ["big-computation"]


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
