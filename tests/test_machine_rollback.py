"""The run state machine rolling back: a failing step, loops, a compensation that raises, and a
rollback requested from outside (driven by the simulated runner in tests/machine_sim.py).
"""

from __future__ import annotations

import msgspec
import pytest

from scoopy.engine.machine import (
    Again,
    Compensate,
    EventSpec,
    EventType,
    Finish,
    Instance,
    Invoke,
    NeedHistory,
    RollbackChildren,
    RunState,
    Transition,
    Wait,
    Wake,
)
from scoopy.failure import (
    NO_MESSAGE,
    ChildRollbackFailed,
    CooperationFailure,
    ParentSaidSo,
    RollbackFailed,
    RollbackRequested,
)
from scoopy.saga import NextStep

from .machine_sim import (
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
    machine,
    rollback_failed,
    rolled_back,
    rolling_back,
    steps,
    suspended,
)

# -- 1. failure in the first step ----------------------------------------------------------


def test_failure_in_the_first_step() -> None:
    m = machine("s1", "s2")
    cause = boom("Geronimo!")
    t = m.resume(RunState(), Wake(T0))
    assert t.action == Invoke(0, 0, 1, 1)
    t = m.step_failed(t.state, Invoke(0, 0, 1, 1), cause, None, T0)
    assert t.action == Again()
    assert t.events == [rolling_back("s1", 0, cause)]
    assert t.state.path == "rollback"
    assert (t.state.origin, t.state.cause, t.state.plan) == ("self", cause, None)
    t = m.resume(t.state, Wake(T0))
    assert t.action == NeedHistory()
    assert t.events == []
    t = m.resume(t.state, Wake(T0, history=()))
    assert t.action == Finish("rolled_back", cause)
    assert t.events == [rolled_back("s1")]


def test_failure_in_the_first_step_through_the_runner() -> None:
    cause = boom("Geronimo!")
    sim = Sim(steps("s1", "s2"), invoke={("s1", 0): Raises(cause)})
    assert sim.run() == Finish("rolled_back", cause)
    assert sim.events == [rolling_back("s1", 0, cause), rolled_back("s1")]
    assert len(sim.transactions) == 1
    assert sim.compensated == []


# -- 2. failure in the second step ----------------------------------------------------------


@pytest.mark.parametrize("children", [0, 2])
def test_failure_in_the_second_step_rolls_back_the_first(children: int) -> None:
    cause = boom("Geronimo!")
    sim = Sim(
        steps("s1", "s2"),
        invoke={("s1", 0): Returns(children=(Child(),) * children), ("s2", 0): Raises(cause)},
    )
    assert sim.run() == Finish("rolled_back", cause)
    assert sim.events == [
        suspended("s1", 0, 1),
        rolling_back("s2", 1, cause),
        children_rolled_back("s1", 0, 2),
        compensated("s1", 0, 3),
        rolled_back("s1"),
    ]
    assert sim.compensated == [Instance(1, 0, 0)]
    assert sim.children_asked == [(1, children)]
    assert sim.failing == Invoke(1, 0, 1, 2)
    if children:
        # The sub-step waits for the children it asked to roll back.
        assert [tx.end for tx in sim.transactions] == [
            Wait(),  # for s1's children
            Wait(),  # s2 failed; s1's children are asked to roll back
            Finish("rolled_back", cause),
        ]
    else:
        assert [tx.end for tx in sim.transactions] == [
            Invoke(1, 0, 1, 2),
            Compensate(Instance(1, 0, 0), 3, cause),  # user code already ran in this one
            Finish("rolled_back", cause),
        ]
    assert all(len(tx.user_code) <= 1 for tx in sim.transactions)


def test_rollback_actions_step_by_step() -> None:
    m = machine("s1", "s2")
    cause = boom()
    t = m.after_invoke(RunState(), Invoke(0, 0, 1, 1), (1, 0))
    t = m.step_failed(t.state, Invoke(1, 0, 1, 2), cause, None, T0)
    t = m.resume(t.state, Wake(T0))
    assert t.action == NeedHistory()
    t = m.resume(t.state, Wake(T0, history=(Instance(1, 0, 0),)))
    assert t.action == RollbackChildren(Instance(1, 0, 0), 2)
    assert t.state.plan == [Instance(1, 0, 0)]
    t = m.after_rollback_children(t.state, RollbackChildren(Instance(1, 0, 0), 2))
    assert t.events == [children_rolled_back("s1", 0, 2)]
    assert t.state.children_done
    assert m.resume(t.state, Wake(T0, pending=3)).action == Wait()
    t = m.resume(t.state, Wake(T0))
    assert t.action == Compensate(Instance(1, 0, 0), 3, cause)
    t = m.after_compensation(t.state, Compensate(Instance(1, 0, 0), 3, cause))
    assert t.events == [compensated("s1", 0, 3)]
    assert t.state.plan == []
    t = m.resume(t.state, Wake(T0))
    assert t == Transition(t.state, Finish("rolled_back", cause), [rolled_back("s1")])


def test_a_step_without_compensation_still_records_its_rollback_sub_steps() -> None:
    cause = boom()
    sim = Sim(
        [FakeStep("s1"), FakeStep("s2", compensate=None), FakeStep("s3")],
        invoke={("s3", 0): Raises(cause)},
    )
    assert sim.run() == Finish("rolled_back", cause)
    assert sim.events[2:] == [
        rolling_back("s3", 2, cause),
        children_rolled_back("s2", 1, 3),
        compensated("s2", 1, 4),
        children_rolled_back("s1", 0, 5),
        compensated("s1", 0, 6),
        rolled_back("s1"),
    ]
    assert sim.compensated == [Instance(1, 0, 0)]


# -- 3. rollback of loops ---------------------------------------------------------------------


def test_loop_instances_roll_back_newest_first_with_their_iterations() -> None:
    cause = boom()
    sim = Sim(
        steps("loop", "last"),
        invoke={
            ("loop", 0): Returns(NextStep.REPEAT),
            ("loop", 1): Returns(NextStep.REPEAT),
            ("last", 0): Raises(cause),
        },
    )
    assert sim.run() == Finish("rolled_back", cause)
    assert sim.events == [
        suspended("loop", 0, 1, 0),
        suspended("loop", 0, 2, 1),
        suspended("loop", 0, 3, 2),
        rolling_back("last", 1, cause),
        children_rolled_back("loop", 0, 4, 2),
        compensated("loop", 0, 5, 2),
        children_rolled_back("loop", 0, 6, 1),
        compensated("loop", 0, 7, 1),
        children_rolled_back("loop", 0, 8, 0),
        compensated("loop", 0, 9, 0),
        rolled_back("loop"),
    ]
    assert sim.compensated == [Instance(3, 0, 2), Instance(2, 0, 1), Instance(1, 0, 0)]


def test_the_failing_iteration_is_not_compensated() -> None:
    cause = boom()
    sim = Sim(
        steps("loop", "last"),
        invoke={("loop", 0): Returns(NextStep.REPEAT), ("loop", 1): Raises(cause)},
    )
    assert sim.run() == Finish("rolled_back", cause)
    assert sim.compensated == [Instance(1, 0, 0)]
    assert sim.events[1] == rolling_back("loop", 0, cause, iteration=1)  # the failing one


def test_children_failing_in_a_repeated_step_roll_back_from_the_iteration_that_launched_them() -> (
    None
):
    """The step is due again (REPEAT) when its children fail: the rollback names the
    iteration that launched them, not the next one."""
    sim = Sim(
        steps("loop", "last"),
        invoke={("loop", 0): Returns(NextStep.REPEAT, children=(Child(failure=boom()),))},
    )
    assert sim.run().status == "rolled_back"
    event = next(e for e in sim.events if e.type == EventType.ROLLING_BACK)
    assert (event.step, event.iteration) == ("loop", 0)


# -- 4. a compensation that raises ------------------------------------------------------------


def test_a_compensation_failure_halts_the_rollback() -> None:
    cause, oops = boom("Geronimo!"), boom("Geronimo again!")
    sim = Sim(
        steps("s1", "s2", "s3"),
        invoke={("s3", 0): Raises(cause)},
        compensate={("s2", 0): oops},
    )
    finish = sim.run()
    assert finish == Finish(
        "rollback_failed",
        cause,
        framework(RollbackFailed, "Rollback of orders failed", [oops, cause]),
    )
    assert sim.events == [
        suspended("s1", 0, 1),
        suspended("s2", 1, 2),
        rolling_back("s3", 2, cause),
        children_rolled_back("s2", 1, 3),
        rollback_failed("s2", oops),
    ]
    assert sim.compensated == [Instance(2, 1, 0)]  # s1 is never compensated
    assert sim.children_asked == [(2, 0)]


def test_a_halted_rollback_lists_the_halting_failure_then_earlier_ones_then_the_cause() -> None:
    e1, r1, oops = boom("child failed"), boom("child rollback failed"), boom("oops")
    sim = Sim(
        steps("s1", "s2"),
        invoke={("s2", 0): Returns(children=(Child(e1, r1),))},
        compensate={("s2", 0): oops},
    )
    cause = framework(
        ChildRollbackFailed, "Child rollback failure occurred while suspended in step [s2]", [r1]
    )
    assert sim.run() == Finish(
        "rollback_failed",
        cause,
        # r1 is reported once, inside the cause.
        framework(RollbackFailed, "Rollback of orders failed", [oops, cause]),
    )
    assert sim.events[-1] == rollback_failed("s2", oops)
    assert sim.compensated == [Instance(2, 1, 0)]


def test_compensation_failed_step_by_step() -> None:
    m = machine("s1", "s2")
    cause, oops = boom(), boom("oops")
    s = RunState(path="rollback", seq=4, last=1, origin="self", cause=cause)
    s = msgspec.structs.replace(s, plan=[Instance(2, 1, 0), Instance(1, 0, 0)], children_done=True)
    t = m.compensation_failed(s, Compensate(Instance(2, 1, 0), 5, cause), oops)
    assert t.events == [rollback_failed("s2", oops)]
    assert t.action == Finish(
        "rollback_failed",
        cause,
        framework(RollbackFailed, "Rollback of orders failed", [oops, cause]),
    )
    assert (t.state.seq, t.state.last) == (5, 1)


# -- 5. rollback requested by the parent ----------------------------------------------------


def said_so(cause: CooperationFailure) -> CooperationFailure:
    return CooperationFailure(
        type=ParentSaidSo.wire_type, message=NO_MESSAGE, source="parent[run-0]", causes=[cause]
    )


def test_parent_requested_rollback_of_a_committed_run() -> None:
    sim = Sim(steps("s1", "s2"), invoke={("s1", 0): Returns(children=(Child(),))})
    assert sim.run() == Finish("committed")
    request = said_so(boom("sibling failed", "sibling[run-9]"))
    sim.request_rollback(request, "parent")
    assert sim.state.path == "rollback"
    assert sim.run() == Finish("rolled_back")  # the parent's failure is not the child's own
    assert sim.events == [
        suspended("s1", 0, 1),
        suspended("s2", 1, 2),
        committed("s2"),
        EventSpec(EventType.ROLLING_BACK, failure=request),
        children_rolled_back("s2", 1, 3),
        compensated("s2", 1, 4),
        children_rolled_back("s1", 0, 5),
        compensated("s1", 0, 6),
        rolled_back("s1"),
    ]
    assert sim.compensated == [Instance(2, 1, 0), Instance(1, 0, 0)]
    assert sim.children_asked == [(2, 0), (1, 1)]
    # each compensation is given the parent's request as the reason
    causes = [a.cause for tx in sim.transactions for a in tx.user_code if isinstance(a, Compensate)]
    assert causes == [request, request]


def test_parent_requested_rollback_that_fails_reports_only_the_rollback_failure() -> None:
    oops = boom("oops")
    sim = Sim(steps("s1", "s2"), compensate={("s1", 0): oops})
    sim.run()
    sim.request_rollback(said_so(boom()), "parent")
    assert sim.run() == Finish(
        "rollback_failed", None, framework(RollbackFailed, "Rollback of orders failed", [oops])
    )


def test_external_rollback_request_is_the_runs_own_failure() -> None:
    sim = Sim(steps("s1"))
    sim.run()
    undo = CooperationFailure(type=RollbackRequested.wire_type, message="undo", source="operator")
    sim.request_rollback(undo, "external")
    assert sim.run() == Finish("rolled_back", undo)


def test_rollback_requested_resets_the_rollback_cursor() -> None:
    m = machine("s1")
    cause = boom()
    dirty = RunState(
        seq=3,
        step=None,
        last=0,
        resume_at=T0,
        plan=[Instance(1, 0, 0)],
        children_done=True,
        errors=[boom("old")],
    )
    s = m.rollback_requested(dirty, cause, "parent")
    assert (s.path, s.origin, s.cause, s.plan, s.children_done, s.errors, s.resume_at) == (
        "rollback",
        "parent",
        cause,
        None,
        False,
        [],
        None,
    )
    assert (s.seq, s.last) == (3, 0)
    assert m.resume(s, Wake(T0)).action == NeedHistory()
