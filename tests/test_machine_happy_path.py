"""The run state machine on the happy path: steps, waiting for children, loops, and a state
that survives JSON (driven by the simulated runner in tests/machine_sim.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import pytest

from scoopy.engine.machine import (
    Again,
    ChildOutcome,
    DetachUnstarted,
    Finish,
    Instance,
    Invoke,
    Machine,
    RunState,
    Transition,
    Wait,
    Wake,
)
from scoopy.errors import SagaDefinitionError
from scoopy.failure import ChildRollbackFailed
from scoopy.saga import NextStep

from .machine_sim import (
    SAGA,
    SOURCE,
    T0,
    Child,
    FakeStep,
    Outcome,
    Returns,
    Sim,
    boom,
    committed,
    framework,
    kinds,
    machine,
    rolling_back,
    roundtrip,
    steps,
    suspended,
)

# -- 1. the happy path ------------------------------------------------------------------------


def test_two_steps_commit_one_step_per_transaction() -> None:
    sim = Sim(steps("s1", "s2"))
    assert sim.run() == Finish("committed")
    assert sim.events == [suspended("s1", 0, 1), suspended("s2", 1, 2), committed("s2")]
    # The runner defers the second piece of user code to a transaction of its own.
    first, second = sim.transactions
    assert first.user_code == [Invoke(0, 0, 1, 1)]
    assert first.events == [suspended("s1", 0, 1)]
    assert first.end == Invoke(1, 0, 1, 2)
    assert second.user_code == [Invoke(1, 0, 1, 2)]
    assert second.events == [suspended("s2", 1, 2), committed("s2")]
    assert second.end == Finish("committed")


def test_happy_path_step_by_step() -> None:
    m = machine("s1", "s2")
    t = m.resume(RunState(), Wake(T0))
    assert t.action == Invoke(0, 0, 1, 1)
    assert t.events == []
    t = m.after_invoke(t.state, Invoke(0, 0, 1, 1), m.next_of(0, 0, None), now=T0)
    assert t.action == Again()
    assert t.state.seq == 1
    assert (t.state.step, t.state.iteration, t.state.last) == (1, 0, 0)
    assert t.state.suspended_at == T0
    t = m.resume(t.state, Wake(T0))
    assert t.action == Invoke(1, 0, 1, 2)
    t = m.after_invoke(t.state, Invoke(1, 0, 1, 2), m.next_of(1, 0, NextStep.CONTINUE))
    assert t.state.step is None
    t = m.resume(t.state, Wake(T0))
    assert t.action == Finish("committed")
    assert t.events == [committed("s2")]


def test_a_single_step_saga_commits_in_one_transaction() -> None:
    sim = Sim(steps("only"))
    assert sim.run() == Finish("committed")
    assert sim.events == [suspended("only", 0, 1), committed("only")]
    assert len(sim.transactions) == 1


def test_a_step_sleeping_delays_the_next_step() -> None:
    later = T0 + timedelta(minutes=5)
    sim = Sim(steps("s1", "s2"), invoke={("s1", 0): Returns(sleep_until=later)})
    assert sim.run() == Finish("committed")
    assert [tx.end for tx in sim.transactions] == [Wait(later), Finish("committed")]
    assert [kinds(tx.user_code) for tx in sim.transactions] == [["Invoke"], ["Invoke"]]
    assert sim.now == later


# -- 2. waiting for children -----------------------------------------------------------------


def test_a_step_with_children_waits_for_them() -> None:
    m = machine("s1", "s2")
    t = m.resume(RunState(), Wake(T0))
    t = m.after_invoke(t.state, Invoke(0, 0, 1, 1), (1, 0))
    assert m.resume(t.state, Wake(T0, pending=2)) == Transition(t.state, Wait())
    assert m.resume(t.state, Wake(T0, pending=1)).action == Wait()
    # Waiting for children is not waiting for a time, whatever the strategy says.
    assert m.resume(t.state, Wake(T0, pending=1, resume_at=T0 + timedelta(1))).action == Wait()
    assert m.resume(t.state, Wake(T0, pending=1, detach=True)).action == DetachUnstarted()
    assert m.resume(t.state, Wake(T0, pending=0)).action == Invoke(1, 0, 1, 2)


def test_children_end_the_transaction_and_the_next_one_runs_the_next_step() -> None:
    sim = Sim(steps("s1", "s2"), invoke={("s1", 0): Returns(children=(Child(), Child()))})
    tx = sim.transaction()
    assert tx.end == Wait()
    assert tx.events == [suspended("s1", 0, 1)]
    assert len(sim.pending) == 2
    sim.settle()
    tx = sim.transaction()
    assert tx.user_code == [Invoke(1, 0, 1, 2)]
    assert tx.end == Finish("committed")
    assert sim.events == [suspended("s1", 0, 1), suspended("s2", 1, 2), committed("s2")]
    assert sim.committed_children == {1: [Child(), Child()]}


def test_the_last_step_commits_only_after_its_children() -> None:
    m = machine("s1")
    t = m.after_invoke(RunState(), Invoke(0, 0, 1, 1), (None, 0))
    assert m.resume(t.state, Wake(T0, pending=1)).action == Wait()
    assert m.resume(t.state, Wake(T0)).action == Finish("committed")


# -- 3. loops ---------------------------------------------------------------------------------


def test_next_of() -> None:
    m = machine("a", "b", "c")
    assert m.next_of(0, 0, None) == (1, 0)
    assert m.next_of(0, 4, NextStep.CONTINUE) == (1, 0)
    assert m.next_of(1, 0, NextStep.REPEAT) == (1, 1)
    assert m.next_of(1, 3, NextStep.REPEAT) == (1, 4)
    # goto(self) is REPEAT; goto(other) starts the target over at iteration 0
    assert m.next_of(1, 3, NextStep.goto("b")) == (1, 4)
    assert m.next_of(1, 3, NextStep.goto("a")) == (0, 0)
    assert m.next_of(0, 2, NextStep.goto("c")) == (2, 0)
    # CONTINUE past the last step: no step left
    assert m.next_of(2, 0, None) == (None, 0)
    assert m.next_of(2, 5, NextStep.CONTINUE) == (None, 0)
    with pytest.raises(SagaDefinitionError, match=r"saga 'orders' has no step 'nope' to go to"):
        m.next_of(0, 0, NextStep.goto("nope"))


class InOrder(Sim):
    """A sim whose invocations return the given outcomes in turn (then plain success)."""

    def __init__(self, steps: Sequence[FakeStep], outcomes: Sequence[Outcome]) -> None:
        super().__init__(steps)
        self.queue = list(outcomes)

    def outcome_of(self, act: Invoke) -> Outcome:
        return self.queue.pop(0) if self.queue else Returns()


def test_repeat_and_goto_iterations_in_a_run() -> None:
    sim = InOrder(
        steps("a", "b", "c"),
        [
            Returns(NextStep.REPEAT),  # a0
            Returns(NextStep.goto("a")),  # a1: goto(self) is REPEAT
            Returns(),  # a2
            Returns(NextStep.goto("a")),  # b0: back to a, which starts over at 0
            Returns(),  # a0
            Returns(NextStep.goto("c")),  # b0
        ],
    )
    assert sim.run() == Finish("committed")
    assert [(a.step, a.iteration) for a in sim.invoked] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (0, 0),
        (1, 0),
        (2, 0),
    ]
    assert [(e.step, e.iteration, e.instance) for e in sim.events[:-1]] == [
        ("a", 0, 1),
        ("a", 1, 2),
        ("a", 2, 3),
        ("b", 0, 4),
        ("a", 0, 5),
        ("b", 0, 6),
        ("c", 0, 7),
    ]
    assert sim.events[-1] == committed("c")
    # one step per transaction
    assert [len(tx.user_code) for tx in sim.transactions] == [1] * 7


def test_continue_from_the_last_step_commits_named_after_it() -> None:
    sim = Sim(steps("a", "b"), invoke={("b", 0): Returns(NextStep.CONTINUE)})
    assert sim.run() == Finish("committed")
    assert sim.events[-1] == committed("b")


def test_goto_an_unknown_step_is_the_step_failing() -> None:
    sim = Sim(steps("a", "b"), invoke={("b", 0): Returns(NextStep.goto("nowhere"))})
    finish = sim.run()
    assert finish.status == "rolled_back"
    assert finish.failure is not None
    assert finish.failure.message == "saga 'orders' has no step 'nowhere' to go to"
    assert sim.events[1] == rolling_back("b", 1, finish.failure)


# -- 4. the state survives JSON --------------------------------------------------------------


def test_state_roundtrips_through_json_and_resumes_the_same() -> None:
    m = Machine([FakeStep("s1", handler=True), FakeStep("s2"), FakeStep("s3")], SAGA, SOURCE)
    cause = framework(ChildRollbackFailed, "x", [boom("a"), boom("b")])
    states = [
        RunState(),
        RunState(step=2, iteration=3, seq=7, last=1, last_iteration=2, handlers=2),
        RunState(attempt=3, attempts=[boom("1"), boom("2")], resume_at=T0 + timedelta(hours=1)),
        RunState(
            path="rollback",
            seq=9,
            step=None,
            last=2,
            suspended_at=T0,
            origin="self",
            cause=cause,
            plan=[Instance(8, 0, 1, 0), Instance(5, 0, 1), Instance(1, 0, 0)],
            children_done=False,
            errors=[boom("rb")],
        ),
        RunState(path="rollback", origin="parent", cause=cause, plan=None, last=2, step=None),
    ]
    for state in states:
        decoded = roundtrip(state)
        assert decoded == state
        for wake in (
            Wake(T0),
            Wake(T0, history=(Instance(1, 0, 0), Instance(2, 1, 0))),
            Wake(T0, pending=1),
            Wake(T0, child_failures=(ChildOutcome("c", "1", "rolled_back", boom(), None),)),
        ):
            if state.path == "happy" and state.last is None and wake.child_failures:
                continue  # children cannot have failed before the first step
            assert m.resume(decoded, wake) == m.resume(state, wake)
