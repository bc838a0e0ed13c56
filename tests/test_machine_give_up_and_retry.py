"""The run state machine giving up (cancellation, deadlines) and retrying a failed step (driven
by the simulated runner in tests/machine_sim.py).
"""

from __future__ import annotations

from datetime import timedelta

from scoopy.engine.machine import (
    Again,
    ChildOutcome,
    Compensate,
    EventSpec,
    EventType,
    Finish,
    Instance,
    Invoke,
    RollbackChildren,
    RunState,
    SkipUnstarted,
    Transition,
    Wait,
    Wake,
)
from scoopy.failure import GaveUp, RetriesExhausted, RollbackFailed

from .machine_sim import (
    DEADLINE_MISSED,
    T0,
    Child,
    Raises,
    Returns,
    Sim,
    boom,
    children_rolled_back,
    compensated,
    framework,
    kinds,
    machine,
    rollback_failed,
    rolled_back,
    rolling_back,
    steps,
    suspended,
)

# -- 1. giving up -----------------------------------------------------------------------------


def test_giving_up_while_children_are_pending_skips_the_unstarted() -> None:
    m = machine("s1", "s2")
    reason = boom("cancelled", "operator")
    s = m.after_invoke(RunState(), Invoke(0, 0, 1, 1), (1, 0)).state
    assert m.resume(s, Wake(T0, pending=2, give_up=reason)) == Transition(s, SkipUnstarted())
    # give-up wins over detaching
    assert m.resume(s, Wake(T0, pending=2, give_up=reason, detach=True)).action == SkipUnstarted()


def test_giving_up_with_nothing_pending_rolls_back() -> None:
    m = machine("s1", "s2")
    reason = boom("cancelled", "operator")
    s = m.after_invoke(RunState(), Invoke(0, 0, 1, 1), (1, 0)).state
    t = m.resume(s, Wake(T0, give_up=reason))
    gave_up = framework(GaveUp, "Gave up: cancelled", [reason])
    assert t.action == Again()
    assert t.events == [rolling_back("s2", 1, gave_up)]
    assert (t.state.path, t.state.cause, t.state.origin) == ("rollback", gave_up, "self")


def test_giving_up_after_the_last_step_names_the_last_step() -> None:
    m = machine("s1", "s2")
    reason = boom("late")
    s = m.after_invoke(RunState(step=1, seq=1, last=0), Invoke(1, 0, 1, 2), (None, 0)).state
    t = m.resume(s, Wake(T0, give_up=reason))
    assert t.events == [rolling_back("s2", 1, framework(GaveUp, "Gave up: late", [reason]))]


def test_giving_up_wins_over_sleeping() -> None:
    m = machine("s1", "s2")
    reason = boom("cancelled", "operator")
    later = T0 + timedelta(hours=1)
    s = m.after_invoke(RunState(), Invoke(0, 0, 1, 1), (1, 0), sleep_until=later).state
    assert m.resume(s, Wake(T0, resume_at=later)).action == Wait(later)
    t = m.resume(s, Wake(T0, resume_at=later, give_up=reason))
    assert t.action == Again()
    assert t.state.path == "rollback"
    assert t.state.resume_at is None


def test_giving_up_on_failed_children_keeps_both_reasons() -> None:
    m = machine("s1", "s2")
    reason, e1, r1 = boom("late"), boom("e1"), boom("r1")
    s = m.after_invoke(RunState(), Invoke(0, 0, 1, 1), (1, 0)).state
    outcome = ChildOutcome("c", "1", "rollback_failed", e1, r1)
    t = m.resume(s, Wake(T0, child_failures=(outcome,), give_up=reason))
    children, _ = m.children_failure(0, [outcome])
    assert t.events == [
        rolling_back("s1", 0, framework(GaveUp, "Gave up: late", [reason, children]))
    ]
    assert t.state.errors == [r1]


def test_cancellation_while_waiting_skips_children_and_rolls_back() -> None:
    reason = boom("cancelled", "operator")
    sim = Sim(steps("s1", "s2"), invoke={("s1", 0): Returns(children=(Child(), Child()))})
    assert sim.transaction().end == Wait()
    sim.give_up_happy = reason  # before the children started
    tx = sim.transaction()
    assert len(sim.skipped) == 2
    # skipping, rolling back and s1's children sub-step are bookkeeping: s1's compensation
    # is the first user code of that transaction
    assert kinds(tx.user_code) == ["Compensate"]
    finish = sim.run()
    gave_up = framework(GaveUp, "Gave up: cancelled", [reason])
    assert finish == Finish("rolled_back", gave_up)
    assert len(sim.skipped) == 2
    assert sim.events == [
        suspended("s1", 0, 1),
        rolling_back("s2", 1, gave_up),
        children_rolled_back("s1", 0, 2),
        compensated("s1", 0, 3),
        rolled_back("s1"),
    ]
    assert sim.children_asked == [(1, 0)]  # the skipped children never committed


def test_giving_up_on_the_rollback_path_halts() -> None:
    m = machine("s1", "s2", "s3")
    cause, reason = boom(), boom("rollback deadline", "deadline")
    s = m.after_invoke(RunState(), Invoke(0, 0, 1, 1), (1, 0)).state
    s = m.after_invoke(s, Invoke(1, 0, 1, 2), (2, 0)).state
    s = m.step_failed(s, Invoke(2, 0, 1, 3), cause, None, T0).state
    history = (Instance(1, 0, 0), Instance(2, 1, 0))
    s = m.resume(s, Wake(T0, history=history)).state
    s = m.after_rollback_children(s, RollbackChildren(Instance(2, 1, 0), 3)).state
    s = m.after_compensation(s, Compensate(Instance(2, 1, 0), 4, cause)).state
    # while children are being rolled back, give-up skips the unstarted ones first
    assert m.resume(s, Wake(T0, pending=1, give_up=reason)).action == SkipUnstarted()
    t = m.resume(s, Wake(T0, give_up=reason))
    gave_up = framework(GaveUp, "Gave up: rollback deadline", [reason])
    # Named after the sub-step that will not run: s1's child scopes.
    assert t.events == [rollback_failed("s1", gave_up, children=True)]
    assert t.action == Finish(
        "rollback_failed",
        cause,
        framework(RollbackFailed, "Rollback of orders failed", [gave_up, cause]),
    )


def test_giving_up_halts_under_the_latest_rollback_sub_step() -> None:
    m = machine("s1", "s2", "s3")
    cause, reason = boom(), boom("rollback deadline", "deadline")
    s = RunState(path="rollback", seq=2, step=2, last=1, origin="self", cause=cause)
    s = m.resume(s, Wake(T0, history=(Instance(1, 0, 0), Instance(2, 1, 0)))).state
    s = m.after_rollback_children(s, RollbackChildren(Instance(2, 1, 0), 3)).state
    s = m.after_compensation(s, Compensate(Instance(2, 1, 0), 4, cause)).state
    s = m.after_rollback_children(s, RollbackChildren(Instance(1, 0, 0), 5)).state
    t = m.resume(s, Wake(T0, give_up=reason))
    assert t.events == [
        rollback_failed("s1", framework(GaveUp, "Gave up: rollback deadline", [reason]))
    ]


def test_a_rollback_deadline_halts_before_anything_is_compensated() -> None:
    cause, reason = boom(), boom("rollback deadline", "deadline")
    sim = Sim(steps("s1", "s2"), invoke={("s2", 0): Raises(cause)})
    sim.give_up_rollback = reason
    finish = sim.run()
    assert finish.status == "rollback_failed"
    assert sim.compensated == []
    assert sim.events[-1] == rollback_failed(
        "s1", framework(GaveUp, "Gave up: rollback deadline", [reason]), children=True
    )


def test_a_deadline_passing_while_a_step_runs_fails_that_step() -> None:
    # runner.user_code asks the strategy once the step returned: the step raises GaveUp,
    # so its work is discarded and it is not compensated.
    sim = Sim(steps("s1", "s2", "s3"))
    sim.happy_deadline = T0 + timedelta(seconds=3)
    sim.user_code_takes = timedelta(seconds=2)
    finish = sim.run()
    gave_up = framework(GaveUp, "Gave up: Missed happy path deadline", [DEADLINE_MISSED])
    assert finish == Finish("rolled_back", gave_up)
    assert sim.events == [
        suspended("s1", 0, 1),
        rolling_back("s2", 1, gave_up),
        children_rolled_back("s1", 0, 2),
        compensated("s1", 0, 3),
        rolled_back("s1"),
    ]


def test_an_instance_that_suspends_in_the_transaction_that_gives_up_is_rolled_back() -> None:
    # The deadline passes after runner.user_code's own give-up check, while the runner
    # writes what the step launched. The step's SUSPENDED commits with the ROLLING_BACK, in
    # the same transaction, so s2 (and anything it did) must be rolled back too.
    sim = Sim(steps("s1", "s2", "s3"), invoke={("s2", 0): Returns(children=(Child(),))})
    sim.happy_deadline = T0 + timedelta(seconds=3)
    sim.bookkeeping_takes = timedelta(seconds=2)
    finish = sim.run()
    gave_up = framework(GaveUp, "Gave up: Missed happy path deadline", [DEADLINE_MISSED])
    assert finish == Finish("rolled_back", gave_up)
    assert sim.transactions[1].events[:2] == [suspended("s2", 1, 2), rolling_back("s3", 2, gave_up)]
    assert len(sim.skipped) == 1  # the child never started
    assert sim.events == [
        suspended("s1", 0, 1),
        suspended("s2", 1, 2),
        rolling_back("s3", 2, gave_up),
        children_rolled_back("s2", 1, 3),
        compensated("s2", 1, 4),
        children_rolled_back("s1", 0, 5),
        compensated("s1", 0, 6),
        rolled_back("s1"),
    ]
    assert sim.compensated == [Instance(2, 1, 0), Instance(1, 0, 0)]


# -- 2. retries -------------------------------------------------------------------------------


def test_retry_records_the_attempt_and_waits_for_the_backoff() -> None:
    m = machine("s1", "s2")
    f1 = boom("flaky")
    s = RunState()
    t = m.step_failed(s, Invoke(0, 0, 1, 1), f1, 5.0, T0)
    assert t.action == Again()
    assert t.events == [
        EventSpec(EventType.ATTEMPT_FAILED, step="s1", step_index=0, iteration=0, failure=f1)
    ]
    assert (t.state.path, t.state.attempt, t.state.attempts) == ("happy", 2, [f1])
    assert t.state.resume_at == T0 + timedelta(seconds=5)
    assert t.state.seq == 0  # the failed attempt is no instance
    wake_at = t.state.resume_at
    early = m.resume(t.state, Wake(T0 + timedelta(seconds=1), resume_at=wake_at))
    assert early.action == Wait(wake_at)
    t = m.resume(t.state, Wake(wake_at, resume_at=wake_at))
    assert t.action == Invoke(0, 0, 2, 1)
    t = m.after_invoke(t.state, Invoke(0, 0, 2, 1), (1, 0))
    assert (t.state.attempt, t.state.attempts, t.state.resume_at) == (1, [], None)


def test_retries_exhausted_rolls_back_with_every_attempt() -> None:
    f1, f2, f3 = boom("one"), boom("two"), boom("three")
    sim = Sim(
        steps("s1", "s2"),
        invoke={("s2", 0): [Raises(f1, 5.0), Raises(f2, 10.0), Raises(f3)]},
    )
    finish = sim.run()
    exhausted = framework(RetriesExhausted, "step 's2' failed after 3 attempts", [f1, f2, f3])
    assert finish == Finish("rolled_back", exhausted)
    assert (sim.state.attempt, sim.state.attempts, sim.state.resume_at) == (1, [], None)
    assert [e.type for e in sim.events] == [
        EventType.SUSPENDED,
        EventType.ATTEMPT_FAILED,
        EventType.ATTEMPT_FAILED,
        EventType.ROLLING_BACK,
        EventType.SUSPENDED,
        EventType.SUSPENDED,
        EventType.ROLLED_BACK,
    ]
    assert sim.events[3] == rolling_back("s2", 1, exhausted)
    assert [a.attempt for a in sim.invoked] == [1, 1, 2, 3]
    assert [a.seq for a in sim.invoked] == [1, 2, 2, 2]
    assert sim.now == T0 + timedelta(seconds=15)
    assert sim.compensated == [Instance(1, 0, 0)]


def test_a_retried_step_that_succeeds_goes_on() -> None:
    sim = Sim(steps("s1", "s2"), invoke={("s1", 0): [Raises(boom(), 1.0), Returns()]})
    assert sim.run() == Finish("committed")
    assert [e.type for e in sim.events] == [
        EventType.ATTEMPT_FAILED,
        EventType.SUSPENDED,
        EventType.SUSPENDED,
        EventType.COMMITTED,
    ]
    assert sim.events[1] == suspended("s1", 0, 1)


def test_a_single_failure_without_retry_is_not_wrapped() -> None:
    cause = boom()
    m = machine("s1")
    t = m.step_failed(RunState(), Invoke(0, 0, 1, 1), cause, None, T0)
    assert t.state.cause == cause
