"""The run state machine and failed children: child-failure handlers on the happy path, and
children whose rollback failed (driven by the simulated runner in tests/machine_sim.py).
"""

from __future__ import annotations

from scoopy.engine.machine import (
    ChildOutcome,
    Compensate,
    Finish,
    HandleChildren,
    Instance,
    Invoke,
    Machine,
    Phase,
    RollbackChildren,
    RunState,
    Wait,
    Wake,
)
from scoopy.failure import NO_MESSAGE, ChildRollbackFailed, ChildRolledBack, RollbackFailed
from scoopy.saga import NextStep

from .machine_sim import (
    SAGA,
    SOURCE,
    T0,
    Child,
    FakeStep,
    Raises,
    Returns,
    Sim,
    boom,
    children_rolled_back,
    committed,
    compensated,
    framework,
    handled,
    kinds,
    machine,
    rollback_failed,
    rolled_back,
    rolling_back,
    steps,
    suspended,
)

# -- 1. child failures on the happy path ------------------------------------------------------


def test_child_failure_reaches_the_handler_and_is_consumed() -> None:
    e1, e2 = boom("child one", "child[1]"), boom("child two", "child[3]")
    m = Machine([FakeStep("s1", handler=True), FakeStep("s2")], SAGA, SOURCE)
    t = m.after_invoke(RunState(), Invoke(0, 0, 1, 1), (1, 0))
    outcomes = (
        ChildOutcome("child", "1", "rolled_back", e1, None),
        ChildOutcome("child", "3", "rolled_back", e2, None),
    )
    assert m.resume(t.state, Wake(T0, pending=1, child_failures=outcomes)).action == Wait()
    t = m.resume(t.state, Wake(T0, child_failures=outcomes))
    expected = framework(
        ChildRolledBack, "Child failure occurred while suspended in step [s1]", [e1, e2]
    )
    assert t.action == HandleChildren(0, expected, 0, 2, ())
    assert t.events == []
    t = m.after_handler(t.state, HandleChildren(0, expected, 0, 2, ()), None)
    assert t.events == [handled("s1", 0, 2, 0)]
    assert t.state.handlers == 1
    # consumed: the next resume has no failures and goes on with the step's NextStep
    t = m.resume(t.state, Wake(T0))
    assert t.action == Invoke(1, 0, 1, 3)


def test_handler_iterations_count_repeated_child_failures() -> None:
    e1, e2, e3 = boom("one"), boom("two"), boom("three")
    sim = Sim(
        [FakeStep("s1", handler=True), FakeStep("s2")],
        invoke={("s1", 0): Returns(children=(Child(e1), Child(), Child(e2)))},
        handle={("s1", 0): Returns(children=(Child(e3),))},  # retries, fails again
    )
    assert sim.run() == Finish("committed")
    assert sim.events == [
        suspended("s1", 0, 1),
        handled("s1", 0, 2, 0),
        handled("s1", 0, 3, 1),
        suspended("s2", 1, 4),
        committed("s2"),
    ]
    first, second = sim.handled
    assert first == HandleChildren(
        0,
        framework(ChildRolledBack, "Child failure occurred while suspended in step [s1]", [e1, e2]),
        0,
        2,
        (),
    )
    assert second.failure.causes == [e3]
    assert (second.handler_iteration, second.seq) == (1, 3)
    # The handler is user code: each runs in a transaction of its own.
    assert [kinds(tx.user_code) for tx in sim.transactions] == [
        ["Invoke"],
        ["HandleChildren"],
        ["HandleChildren"],
        ["Invoke"],
    ]


def test_a_new_step_starts_counting_handler_iterations_again() -> None:
    sim = Sim(
        [FakeStep("s1", handler=True), FakeStep("s2", handler=True)],
        invoke={
            ("s1", 0): Returns(children=(Child(boom()),)),
            ("s2", 0): Returns(children=(Child(boom()),)),
        },
    )
    assert sim.run() == Finish("committed")
    assert [(a.step, a.handler_iteration) for a in sim.handled] == [(0, 0), (1, 0)]


def test_a_handler_of_a_looped_step_sees_the_steps_iteration() -> None:
    cause = boom()
    sim = Sim(
        [FakeStep("loop", handler=True), FakeStep("s2")],
        invoke={
            ("loop", 0): Returns(NextStep.REPEAT),
            ("loop", 1): Returns(children=(Child(boom("child")),)),
            ("s2", 0): Raises(cause),
        },
        handle={("loop", 0): Returns(NextStep.REPEAT)},  # relative to iteration 1
    )
    assert sim.run() == Finish("rolled_back", cause)
    assert sim.events == [
        suspended("loop", 0, 1, 0),
        suspended("loop", 0, 2, 1),
        handled("loop", 0, 3, 0, iteration=1),
        suspended("loop", 0, 4, 2),
        rolling_back("s2", 1, cause),
        children_rolled_back("loop", 0, 5, 2),
        compensated("loop", 0, 6, 2),
        children_rolled_back("loop", 0, 7, 1, handler=0),
        children_rolled_back("loop", 0, 8, 1),
        compensated("loop", 0, 9, 1),
        children_rolled_back("loop", 0, 10, 0),
        compensated("loop", 0, 11, 0),
        rolled_back("loop"),
    ]


def test_the_handler_can_redirect_the_run() -> None:
    sim = Sim(
        [FakeStep("s1", handler=True), FakeStep("s2"), FakeStep("s3")],
        invoke={("s1", 0): Returns(children=(Child(boom()),))},
        handle={("s1", 0): Returns(NextStep.REPEAT)},
    )
    assert sim.run() == Finish("committed")
    assert [(e.step, e.phase, e.iteration) for e in sim.events] == [
        ("s1", Phase.STEP, 0),
        ("s1", Phase.HANDLER, 0),
        ("s1", Phase.STEP, 1),
        ("s2", Phase.STEP, 0),
        ("s3", Phase.STEP, 0),
        ("s3", None, None),
    ]
    redirected = Sim(
        [FakeStep("s1", handler=True), FakeStep("s2"), FakeStep("s3")],
        invoke={("s1", 0): Returns(children=(Child(boom()),))},
        handle={("s1", 0): Returns(NextStep.goto("s3"))},
    )
    assert redirected.run() == Finish("committed")
    assert [e.step for e in redirected.events] == ["s1", "s1", "s3", "s3"]


def test_without_a_handler_the_child_failure_rolls_the_parent_back() -> None:
    e1 = boom("child", "child[1]")
    sim = Sim(steps("s1", "s2"), invoke={("s1", 0): Returns(children=(Child(e1), Child()))})
    cause = framework(ChildRolledBack, "Child failure occurred while suspended in step [s1]", [e1])
    assert sim.run() == Finish("rolled_back", cause)
    assert sim.events == [
        suspended("s1", 0, 1),
        rolling_back("s1", 0, cause),
        children_rolled_back("s1", 0, 2),
        compensated("s1", 0, 3),
        rolled_back("s1"),
    ]
    # the sibling that committed is asked to roll back; the failed one is not
    assert sim.children_asked == [(1, 1)]
    # no handler: nothing of the user's ran when the failure was seen
    assert sim.transactions[1].user_code == []


def test_a_handler_that_raises_rolls_back_and_handler_instances_roll_back_first() -> None:
    e1, e2, raised = boom("one"), boom("two"), boom("handler gives up")
    sim = Sim(
        [FakeStep("s1"), FakeStep("s2", handler=True), FakeStep("s3")],
        invoke={("s2", 0): Returns(children=(Child(e1), Child()))},
        handle={
            ("s2", 0): Returns(children=(Child(), Child(e2))),
            ("s2", 1): Raises(raised),
        },
    )
    assert sim.run() == Finish("rolled_back", raised)
    assert sim.events == [
        suspended("s1", 0, 1),
        suspended("s2", 1, 2),
        handled("s2", 1, 3, 0),
        rolling_back("s2", 1, raised),
        children_rolled_back("s2", 1, 4, handler=0),  # the handler instance: children only
        children_rolled_back("s2", 1, 5),
        compensated("s2", 1, 6),
        children_rolled_back("s1", 0, 7),
        compensated("s1", 0, 8),
        rolled_back("s1"),
    ]
    assert sim.children_asked == [(3, 1), (2, 1), (1, 0)]


# -- 2. children whose rollback failed --------------------------------------------------------


def test_child_rollback_failed_composition() -> None:
    m = machine("s1")
    e1, e2, r1, r3 = boom("e1"), boom("e2"), boom("r1"), boom("r3")
    failure, tainted = m.children_failure(
        0,
        [
            ChildOutcome("a", "1", "rollback_failed", e1, r1),
            ChildOutcome("b", "2", "rolled_back", e2, None),
            ChildOutcome("c", "3", "rollback_failed", None, r3),
        ],
    )
    assert failure == framework(
        ChildRollbackFailed,
        "Child rollback failure occurred while suspended in step [s1]",
        [r1, r3, framework(ChildRolledBack, NO_MESSAGE, [e2])],
    )
    assert tainted == [r1, r3]
    # without children that rolled back cleanly there is no ChildRolledBack among the causes
    failure, tainted = m.children_failure(0, [ChildOutcome("a", "1", "rollback_failed", e1, r1)])
    assert failure.causes == [r1]
    assert tainted == [r1]
    # and without rollback failures it is a plain ChildRolledBack
    failure, tainted = m.children_failure(0, [ChildOutcome("b", "2", "rolled_back", e2, None)])
    assert failure.type == ChildRolledBack.wire_type
    assert tainted == []


def test_a_child_rollback_failure_seen_on_the_happy_path_ends_in_rollback_failed() -> None:
    e1, r1 = boom("child failed"), boom("child rollback failed")
    sim = Sim(
        steps("s1", "s2"),
        invoke={("s1", 0): Returns(children=(Child(e1, r1), Child()))},
    )
    cause = framework(
        ChildRollbackFailed, "Child rollback failure occurred while suspended in step [s1]", [r1]
    )
    finish = sim.run()
    # r1 is reported once, inside the cause it belongs to.
    assert finish == Finish(
        "rollback_failed",
        cause,
        framework(RollbackFailed, "Rollback of orders failed", [cause]),
    )
    # The parent's own rollback still runs to the end (the sibling and s1 are rolled back).
    assert sim.events == [
        suspended("s1", 0, 1),
        rolling_back("s1", 0, cause),
        children_rolled_back("s1", 0, 2),
        compensated("s1", 0, 3),
        rollback_failed("s1", r1),
    ]
    assert sim.children_asked == [(1, 1)]


def test_a_child_rollback_failure_during_rollback_does_not_stop_the_parent() -> None:
    cause, r1, r2 = boom(), boom("r1"), boom("r2")
    sim = Sim(
        steps("s1", "s2", "s3"),
        invoke={
            ("s1", 0): Returns(children=(Child(rollback_failure=r1),)),
            ("s2", 0): Returns(children=(Child(rollback_failure=r2), Child())),
            ("s3", 0): Raises(cause),
        },
    )
    finish = sim.run()
    errors = [r2, r1]
    together = framework(
        ChildRollbackFailed, "Child rollback failure occurred while rolling back", errors
    )
    assert finish == Finish(
        "rollback_failed",
        cause,
        framework(RollbackFailed, "Rollback of orders failed", [*errors, cause]),
    )
    assert sim.compensated == [Instance(2, 1, 0), Instance(1, 0, 0)]
    assert sim.events[-1] == rollback_failed("s1", together)


def test_children_failing_while_rolling_back_are_not_swallowed() -> None:
    m = machine("s1", "s2")
    cause, own, rb = boom(), boom("own"), boom("rb")
    s = m.after_invoke(RunState(), Invoke(0, 0, 1, 1), (1, 0)).state
    s = m.step_failed(s, Invoke(1, 0, 1, 2), cause, None, T0).state
    s = m.resume(s, Wake(T0, history=(Instance(1, 0, 0),))).state
    s = m.after_rollback_children(s, RollbackChildren(Instance(1, 0, 0), 2)).state
    t = m.resume(
        s,
        Wake(
            T0,
            child_failures=(
                ChildOutcome("c", "1", "rolled_back", own, None),
                ChildOutcome("c", "2", "rollback_failed", None, rb),
            ),
        ),
    )
    assert t.action == Compensate(Instance(1, 0, 0), 3, cause)
    assert t.state.errors == [
        framework(ChildRolledBack, "Child failure occurred while rolling back", [own]),
        rb,
    ]
