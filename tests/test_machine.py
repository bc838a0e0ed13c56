"""The run state machine (`scoopy.engine.machine`), driven without a database.

`Sim` plays the runner (`scoopy.engine.runner._Advance.advance`) against scripted fake
steps: one simulated transaction resumes the persisted state, performs actions until the
machine says Wait/Finish, and, like the runner, runs at most one piece of user code (a step,
a child-failure handler or a compensation) before deferring the next one to a fresh
transaction. Between transactions the state goes through msgspec JSON, as in the database.
Children launched by a step are not run until the transaction that launched them ended with
`Wait()`; then they finish all at once with their scripted outcome.

Like the runner, `NeedHistory` is answered from the events of earlier transactions plus the
ones this transaction has buffered so far, and, like runner.user_code,
the strategy's give-up is asked again right after each piece of user code returns.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Literal

import msgspec
import pytest

from scoopy.engine.machine import (
    USER_CODE,
    Action,
    Again,
    ChildOutcome,
    Compensate,
    DetachUnstarted,
    EventSpec,
    EventType,
    Finish,
    HandleChildren,
    Instance,
    Invoke,
    Machine,
    NeedHistory,
    Phase,
    RollbackChildren,
    RunState,
    SkipUnstarted,
    Transition,
    Wait,
    Wake,
)
from scoopy.errors import SagaDefinitionError
from scoopy.failure import (
    NO_MESSAGE,
    ChildRollbackFailed,
    ChildRolledBack,
    CooperationError,
    CooperationFailure,
    GaveUp,
    ParentSaidSo,
    RetriesExhausted,
    RollbackFailed,
    RollbackRequested,
)
from scoopy.saga import NextStep

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
SAGA = "orders"
SOURCE = "orders[run-1]"

_state_encoder = msgspec.json.Encoder()
_state_decoder = msgspec.json.Decoder(RunState)

DEADLINE_MISSED = CooperationFailure(
    type="scoopy.DeadlineMissed", message="Missed happy path deadline", source="deadline"
)


def roundtrip(state: RunState) -> RunState:
    """The state as the runner stores it and reads it back."""
    return _state_decoder.decode(_state_encoder.encode(state))


def boom(message: str = "boom", source: str = SOURCE) -> CooperationFailure:
    return CooperationFailure(type="RuntimeError", message=message, source=source)


def framework(
    kind: type[CooperationError], message: str, causes: Sequence[CooperationFailure] = ()
) -> CooperationFailure:
    """A failure the machine makes itself (no stack of its own)."""
    return CooperationFailure(
        type=kind.wire_type, message=message, source=SOURCE, causes=list(causes)
    )


def definition_error(exc: SagaDefinitionError) -> CooperationFailure:
    return CooperationFailure(type="scoopy.SagaDefinitionError", message=str(exc), source=SOURCE)


# -- the fakes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeStep:
    """What the machine sees of a step: a name and whether it has a compensation."""

    name: str
    compensate: object | None = "undo"
    handler: bool = False  # whether it has an on_child_failure handler


@dataclass(frozen=True)
class Child:
    """A child run: `failure` if it fails by itself; `rollback_failure` if its rollback fails.

    A child without `failure` commits; if its parent later asks it to roll back, it rolls
    back cleanly unless `rollback_failure` is set.
    """

    failure: CooperationFailure | None = None
    rollback_failure: CooperationFailure | None = None


@dataclass(frozen=True)
class Returns:
    """User code returns (`next` as a step's NextStep), having launched `children`."""

    next: NextStep | None = None
    children: tuple[Child, ...] = ()
    sleep_until: datetime | None = None


@dataclass(frozen=True)
class Raises:
    """User code raises `failure`; a step is retried in `retry_in` seconds if that is set."""

    failure: CooperationFailure
    retry_in: float | None = None


Outcome = Returns | Raises


@dataclass
class Tx:
    """One simulated transaction."""

    events: list[EventSpec] = field(default_factory=list)
    user_code: list[Action] = field(default_factory=list)
    end: Action | None = None  # Wait, Finish, or the user-code action deferred to the next


class Sim:
    """Drives one run of `steps` the way the runner does. Scripts default to success.

    invoke: (step name, iteration) -> outcome, or a list of outcomes indexed by attempt - 1.
    handle: (step name, handler iteration) -> outcome of its on_child_failure handler.
    compensate: (step name, iteration) -> the failure its compensation raises.
    """

    def __init__(
        self,
        steps: Sequence[FakeStep],
        invoke: Mapping[tuple[str, int], Outcome | Sequence[Outcome]] | None = None,
        handle: Mapping[tuple[str, int], Outcome] | None = None,
        compensate: Mapping[tuple[str, int], CooperationFailure] | None = None,
    ) -> None:
        self.steps = list(steps)
        self.machine = Machine(self.steps, SAGA, SOURCE)
        self.invoke_script = dict(invoke or {})
        self.handle_script = dict(handle or {})
        self.compensate_script = dict(compensate or {})
        self.state = RunState()
        self.now = T0
        self.give_up_happy: CooperationFailure | None = None  # e.g. a cancellation
        self.give_up_rollback: CooperationFailure | None = None  # e.g. a rollback deadline
        self.happy_deadline: datetime | None = None  # give up on the happy path from then on
        self.user_code_takes = timedelta(0)  # the clock moves while user code runs,
        self.bookkeeping_takes = timedelta(0)  # and while the runner writes what it launched
        self.events: list[EventSpec] = []
        self.transactions: list[Tx] = []
        self.finish: Finish | None = None
        # children
        self.pending: list[Child] = []  # launched by the latest instance, not finished yet
        self.pending_from = 0  # the instance that launched them
        self.asked: list[Child] = []  # asked to roll back, not finished yet
        self.arrived: tuple[ChildOutcome, ...] = ()  # failures for the next transaction
        self.committed_children: dict[int, list[Child]] = {}  # by launching instance
        self.skipped: list[Child] = []
        self.detached: list[Child] = []
        self.children_asked: list[tuple[int, int]] = []  # (instance, children asked)
        self.child_rollback_failures: list[CooperationFailure] = []  # as delivered
        # user code
        self.invoked: list[Invoke] = []
        self.raised: list[Invoke] = []  # invocations that raised
        self.failing: Invoke | None = None  # the invocation whose failure started the rollback
        self.handled: list[HandleChildren] = []
        self.compensated: list[Instance] = []  # compensations attempted, in order
        self.compensation_failures: list[Instance] = []
        self.resumes = 0
        self._deferred: tuple[Action, object] | None = None
        self._children_seen = 0

    # -- scripts (overridden by the randomised sim) -----------------------------------------

    def outcome_of(self, act: Invoke) -> Outcome:
        scripted = self.invoke_script.get((self.steps[act.step].name, act.iteration), Returns())
        if isinstance(scripted, Returns | Raises):
            return scripted
        return scripted[act.attempt - 1]

    def handler_outcome_of(self, act: HandleChildren) -> Outcome:
        return self.handle_script.get((self.steps[act.step].name, act.handler_iteration), Returns())

    def compensation_outcome_of(self, act: Compensate) -> CooperationFailure | None:
        return self.compensate_script.get(
            (self.steps[act.instance.step].name, act.instance.iteration)
        )

    # -- the world around the run ---------------------------------------------------------

    def wake(
        self,
        state: RunState,
        child_failures: tuple[ChildOutcome, ...] = (),
        history: tuple[Instance, ...] | None = None,
    ) -> Wake:
        # The default strategy: resume when the requested sleep is over; give up per path.
        return Wake(
            now=self.now,
            pending=len(self.pending) + len(self.asked),
            child_failures=child_failures,
            history=history,
            give_up=self.give_up_on(state.path),
            resume_at=state.resume_at,
        )

    def give_up_on(self, path: Literal["happy", "rollback"]) -> CooperationFailure | None:
        if path == "rollback":
            return self.give_up_rollback
        deadline = self.happy_deadline
        missed = deadline is not None and deadline <= self.now
        return self.give_up_happy or (DEADLINE_MISSED if missed else None)

    def user_code_ran(self, path: Literal["happy", "rollback"]) -> CooperationFailure | None:
        """The clock moves while user code runs; then runner.user_code asks the strategy
        whether to give up, and if so the code raises GaveUp (its work is discarded)."""
        self.now += self.user_code_takes
        reason = self.give_up_on(path)
        return None if reason is None else self.machine.gave_up(reason)

    def resume(self, state: RunState, wake: Wake) -> Transition:
        self.resumes += 1
        return self.machine.resume(state, wake)

    def history(self, tx: Tx | None = None) -> tuple[Instance, ...]:
        """What the runner reads: the run's happy-path SUSPENDED events, oldest first.

        The events of earlier transactions come from the store; the runner adds those of the
        current transaction, which it writes only when the transaction finishes.
        """
        found: list[Instance] = []
        for e in [*self.events, *(tx.events if tx is not None else [])]:
            if e.type is EventType.SUSPENDED and e.phase in (Phase.STEP, Phase.HANDLER):
                assert e.instance is not None and e.step_index is not None
                assert e.iteration is not None
                found.append(Instance(e.instance, e.step_index, e.iteration, e.handler_iteration))
        return tuple(found)

    def child_outcome(self, child: Child, asked: bool) -> ChildOutcome:
        self._children_seen += 1
        status = "rollback_failed" if child.rollback_failure is not None else "rolled_back"
        # A child rolled back at its parent's request reports no failure of its own.
        return ChildOutcome(
            "child",
            f"child-{self._children_seen}",
            status,
            None if asked else child.failure,
            child.rollback_failure,
        )

    def settle(self) -> None:
        """Every child the run waits for finishes."""
        outcomes: list[ChildOutcome] = []
        for child in self.pending:
            if child.failure is None:
                self.committed_children.setdefault(self.pending_from, []).append(child)
            else:
                outcomes.append(self.child_outcome(child, asked=False))
        for child in self.asked:
            if child.rollback_failure is not None:
                outcomes.append(self.child_outcome(child, asked=True))
        self.child_rollback_failures.extend(
            o.rollback_failure for o in outcomes if o.rollback_failure is not None
        )
        self.pending, self.asked = [], []
        self.arrived = tuple(outcomes)

    def launch(self, instance: int, children: tuple[Child, ...]) -> None:
        assert not self.pending, "a new instance runs only once the previous one's children ended"
        self.pending = list(children)
        self.pending_from = instance

    def request_rollback(
        self, cause: CooperationFailure, origin: Literal["parent", "external"]
    ) -> None:
        """A parent (or an operator) asks the finished run to roll back (runner.advance)."""
        assert self.finish is not None and self.finish.status == "committed"
        self.state = self.machine.rollback_requested(self.state, cause, origin)
        self.events.append(EventSpec(EventType.ROLLING_BACK, failure=cause))
        self.finish = None

    # -- user code and bookkeeping ----------------------------------------------------------

    def do_invoke(self, state: RunState, act: Invoke) -> Transition:
        self.invoked.append(act)
        outcome = self.outcome_of(act)
        retry_in: float | None = None
        if isinstance(outcome, Raises):
            failure: CooperationFailure | None = outcome.failure
            retry_in = outcome.retry_in
        else:
            try:
                following = self.machine.next_of(act.step, act.iteration, outcome.next)
            except SagaDefinitionError as exc:  # raised inside the step's user code
                failure = definition_error(exc)
            else:
                failure = self.user_code_ran("happy")  # giving up is never retried
                if failure is None:
                    self.launch(act.seq, outcome.children)
                    return self.machine.after_invoke(
                        state, act, following, outcome.sleep_until, now=self.now
                    )
        assert failure is not None
        self.raised.append(act)
        t = self.machine.step_failed(state, act, failure, retry_in, self.now)
        if t.state.path == "rollback":
            self.failing = act
        return t

    def do_handle(self, state: RunState, act: HandleChildren) -> Transition:
        if not self.steps[act.step].handler:
            return self.machine.handler_failed(state, act, act.failure)
        self.handled.append(act)
        outcome = self.handler_outcome_of(act)
        if isinstance(outcome, Raises):
            return self.machine.handler_failed(state, act, outcome.failure)
        try:
            following = (
                None
                if outcome.next is None
                else self.machine.next_of(act.step, state.last_iteration, outcome.next)
            )
        except SagaDefinitionError as exc:  # raised inside the handler's user code
            return self.machine.handler_failed(state, act, definition_error(exc))
        gave_up = self.user_code_ran("happy")
        if gave_up is not None:
            return self.machine.handler_failed(state, act, gave_up)
        self.launch(act.seq, outcome.children)
        return self.machine.after_handler(state, act, following, now=self.now)

    def do_compensate(self, state: RunState, act: Compensate) -> Transition:
        assert self.steps[act.instance.step].compensate is not None
        self.compensated.append(act.instance)
        failure = self.compensation_outcome_of(act) or self.user_code_ran("rollback")
        if failure is not None:
            self.compensation_failures.append(act.instance)
            return self.machine.compensation_failed(state, act, failure)
        return self.machine.after_compensation(state, act, now=self.now)

    def do_rollback_children(self, state: RunState, act: RollbackChildren) -> Transition:
        self.asked = self.committed_children.pop(act.instance.seq, [])
        self.children_asked.append((act.instance.seq, len(self.asked)))
        return self.machine.after_rollback_children(state, act)

    # -- transactions -----------------------------------------------------------------------

    def _wake_facts(self) -> object:
        return (self.give_up_happy, self.give_up_rollback, self.now)

    def transaction(self) -> Tx:
        """One claim of the run, as runner.advance() does it."""
        assert self.finish is None, "the run is finished"
        state = roundtrip(self.state)  # what the runner reads back from `run.state`
        assert state == self.state, "the state does not survive JSON"
        tx = Tx()
        failures, self.arrived = self.arrived, ()
        history: tuple[Instance, ...] | None = None
        t = self.resume(state, self.wake(state, failures))
        if self._deferred is not None:
            deferred, facts = self._deferred
            self._deferred = None
            if facts == self._wake_facts() and not failures:
                # resume is a pure function of the persisted state: the runner recomputes
                # the deferred action in the next transaction and must get the same one.
                assert t.action == deferred
        ran_user_code = False
        for _ in range(1000):
            state = t.state
            tx.events.extend(t.events)
            act = t.action
            if isinstance(act, USER_CODE) and ran_user_code:
                self._deferred = (act, self._wake_facts())
                tx.end = act
                break
            if isinstance(act, Again):
                t = self.resume(state, self.wake(state, history=history))
            elif isinstance(act, NeedHistory):
                history = self.history(tx)
                t = self.resume(state, self.wake(state, history=history))
            elif isinstance(act, Invoke):
                tx.user_code.append(act)
                ran_user_code = True
                t = self.do_invoke(state, act)
                self.now += self.bookkeeping_takes
            elif isinstance(act, HandleChildren):
                if self.steps[act.step].handler:
                    tx.user_code.append(act)
                    ran_user_code = True
                t = self.do_handle(state, act)
                self.now += self.bookkeeping_takes
            elif isinstance(act, Compensate):
                tx.user_code.append(act)
                ran_user_code = True
                t = self.do_compensate(state, act)
                self.now += self.bookkeeping_takes
            elif isinstance(act, RollbackChildren):
                t = self.do_rollback_children(state, act)
            elif isinstance(act, SkipUnstarted | DetachUnstarted):
                # Children launched by a step have not started while the run waits for
                # them; children asked to roll back are committed runs and finish anyway.
                released = self.skipped if isinstance(act, SkipUnstarted) else self.detached
                released.extend(self.pending)
                self.pending = []
                if self.asked:
                    tx.end = Wait()
                    break
                t = self.resume(state, self.wake(state, history=history))
            elif isinstance(act, Wait):
                tx.end = act
                break
            else:
                assert isinstance(act, Finish)
                self.finish = act
                tx.end = act
                break
        else:
            raise AssertionError("a transaction that never stops")
        self.state = state
        self.events.extend(tx.events)
        self.transactions.append(tx)
        return tx

    def run(self, max_transactions: int = 200) -> Finish:
        """Transactions until the run finishes; children and clocks move in between."""
        while self.finish is None:
            assert len(self.transactions) < max_transactions, "the run does not terminate"
            self.before_transaction()
            if (self.pending or self.asked) and self.children_finish():
                self.settle()
            tx = self.transaction()
            if isinstance(tx.end, Wait) and not (self.pending or self.asked):
                assert tx.end.until is not None, "Wait() with nothing to wait for"
                assert tx.end.until > self.now
                self.now = tx.end.until
        return self.finish

    def before_transaction(self) -> None:
        """A hook for the randomised sim."""

    def children_finish(self) -> bool:
        """Whether the children the run waits for finish before its next transaction."""
        return True


# -- event helpers ---------------------------------------------------------------------------


def suspended(step: str, index: int, instance: int, iteration: int = 0) -> EventSpec:
    return EventSpec(
        EventType.SUSPENDED,
        step=step,
        phase=Phase.STEP,
        step_index=index,
        instance=instance,
        iteration=iteration,
    )


def handled(step: str, index: int, instance: int, handler: int, iteration: int = 0) -> EventSpec:
    return EventSpec(
        EventType.SUSPENDED,
        step=step,
        phase=Phase.HANDLER,
        step_index=index,
        instance=instance,
        iteration=iteration,
        handler_iteration=handler,
    )


def rolling_back(
    step: str, index: int, failure: CooperationFailure, iteration: int | None = 0
) -> EventSpec:
    return EventSpec(
        EventType.ROLLING_BACK, step=step, step_index=index, iteration=iteration, failure=failure
    )


def children_rolled_back(
    step: str, index: int, instance: int, iteration: int = 0, handler: int | None = None
) -> EventSpec:
    return EventSpec(
        EventType.SUSPENDED,
        step=f"Rollback of {step} (rolling back child scopes)",
        phase=Phase.CHILDREN,
        step_index=index,
        instance=instance,
        iteration=iteration,
        handler_iteration=handler,
    )


def compensated(step: str, index: int, instance: int, iteration: int = 0) -> EventSpec:
    return EventSpec(
        EventType.SUSPENDED,
        step=f"Rollback of {step}",
        phase=Phase.COMPENSATION,
        step_index=index,
        instance=instance,
        iteration=iteration,
    )


def committed(step: str) -> EventSpec:
    return EventSpec(EventType.COMMITTED, step=step)


def rolled_back(step: str) -> EventSpec:
    return EventSpec(EventType.ROLLED_BACK, step=f"Rollback of {step}")


def rollback_failed(step: str, failure: CooperationFailure, children: bool = False) -> EventSpec:
    name = f"Rollback of {step}" + (" (rolling back child scopes)" if children else "")
    return EventSpec(EventType.ROLLBACK_FAILED, step=name, failure=failure)


def steps(*names: str) -> list[FakeStep]:
    return [FakeStep(name) for name in names]


def machine(*names: str) -> Machine:
    return Machine(steps(*names), SAGA, SOURCE)


def kinds(actions: Sequence[Action]) -> list[str]:
    return [type(a).__name__ for a in actions]


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


# -- 4. failure in the first step ----------------------------------------------------------


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


# -- 5. failure in the second step ----------------------------------------------------------


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


# -- 6. rollback of loops ---------------------------------------------------------------------


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


# -- 7. child failures on the happy path ------------------------------------------------------


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


# -- 8. children whose rollback failed --------------------------------------------------------


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


# -- 9. a compensation that raises ------------------------------------------------------------


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


# -- 10. giving up -----------------------------------------------------------------------------


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


# -- 11. retries -------------------------------------------------------------------------------


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


# -- 12. rollback requested by the parent ----------------------------------------------------


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


# -- 13. the state survives JSON -------------------------------------------------------------


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


# -- properties over random sagas ----------------------------------------------------------


class RandomSim(Sim):
    """A saga whose steps, handlers and compensations behave at random (seeded)."""

    def __init__(self, seed: int, mid_transaction_deadline: bool = False) -> None:
        self.rng = random.Random(seed)
        rng = self.rng
        count = rng.randint(1, 4)
        super().__init__(
            [
                FakeStep(
                    f"s{i}",
                    compensate="undo" if rng.random() < 0.7 else None,
                    handler=rng.random() < 0.5,
                )
                for i in range(count)
            ]
        )
        self.budget = rng.randint(1, 10)  # invocations that may loop back
        self.cancel_at = rng.randint(0, 8) if rng.random() < 0.25 else None
        self.deadline_at = rng.randint(0, 12) if rng.random() < 0.05 else None
        self.cancellation = boom("cancelled", "operator")
        self.deadline = boom("rollback deadline", "deadline")
        if mid_transaction_deadline:
            # A happy-path deadline that can pass after runner.user_code's give-up check.
            self.happy_deadline = T0 + timedelta(seconds=rng.randint(1, 8))
            self.bookkeeping_takes = timedelta(seconds=1)

    def next_step(self, iteration: int) -> NextStep | None:
        rng = self.rng
        if self.budget <= 0:
            return rng.choice([None, NextStep.CONTINUE])
        self.budget -= 1
        choices: list[NextStep | None] = [None, NextStep.CONTINUE]
        if iteration < 2:
            choices.append(NextStep.REPEAT)
        choices.append(NextStep.goto(rng.choice(self.steps).name))
        if rng.random() < 0.03:
            choices.append(NextStep.goto("missing"))
        return rng.choice(choices)

    def children(self, fail: float) -> tuple[Child, ...]:
        rng = self.rng
        return tuple(
            Child(
                boom(f"child {i}", f"child[{i}]") if rng.random() < fail else None,
                boom(f"child {i} rollback") if rng.random() < 0.1 else None,
            )
            for i in range(rng.choice([0, 0, 1, 2]))
        )

    def outcome_of(self, act: Invoke) -> Outcome:
        rng = self.rng
        if rng.random() < 0.12:
            retry = rng.choice([1.0, 5.0]) if act.attempt < 3 and rng.random() < 0.5 else None
            return Raises(boom(f"step {act.step} attempt {act.attempt}"), retry)
        sleep = self.now + timedelta(seconds=30) if rng.random() < 0.1 else None
        return Returns(self.next_step(act.iteration), self.children(0.25), sleep)

    def handler_outcome_of(self, act: HandleChildren) -> Outcome:
        rng = self.rng
        if rng.random() < 0.3:
            return Raises(boom(f"handler {act.step}/{act.handler_iteration}"))
        nxt = self.next_step(self.state.last_iteration) if rng.random() < 0.3 else None
        children = self.children(0.3) if act.handler_iteration < 2 else ()
        return Returns(nxt, children)

    def compensation_outcome_of(self, act: Compensate) -> CooperationFailure | None:
        return boom(f"undo {act.instance.seq}") if self.rng.random() < 0.07 else None

    def children_finish(self) -> bool:
        return self.rng.random() < 0.7

    def before_transaction(self) -> None:
        if len(self.transactions) == self.cancel_at:
            self.give_up_happy = self.cancellation
        if len(self.transactions) == self.deadline_at:
            self.give_up_rollback = self.deadline


def check_invariants(sim: Sim) -> None:
    """Properties every run has, whatever its script."""
    finish = sim.finish
    assert finish is not None
    events = sim.events
    terminal = {
        "committed": EventType.COMMITTED,
        "rolled_back": EventType.ROLLED_BACK,
        "rollback_failed": EventType.ROLLBACK_FAILED,
    }
    assert [e for e in events if e.type in terminal.values()] == [events[-1]]
    assert events[-1].type is terminal[finish.status]
    assert sim.resumes < 20 * len(sim.transactions)  # bounded transitions per transaction

    # At most one piece of user code per transaction; a transaction ends in Wait, Finish or
    # a deferred piece of user code, and only the last one finishes.
    for tx in sim.transactions:
        assert len(tx.user_code) <= 1
        assert isinstance(tx.end, Wait | Finish | Invoke | HandleChildren | Compensate)
    assert all(not isinstance(tx.end, Finish) for tx in sim.transactions[:-1])

    # Instances and sub-steps are numbered in order.
    numbered = [e.instance for e in events if e.type is EventType.SUSPENDED]
    assert all(a is not None and b is not None and a < b for a, b in pairwise(numbered))

    # Iterations count consecutive executions of one step.
    steps_done = [e for e in events if e.type is EventType.SUSPENDED and e.phase is Phase.STEP]
    previous: list[EventSpec | None] = [None, *steps_done]
    for before, e in zip(previous, steps_done, strict=False):
        if before is not None and before.step_index == e.step_index:
            assert before.iteration is not None
            assert e.iteration == before.iteration + 1
        else:
            assert e.iteration == 0
    retried = sum(1 for e in events if e.type is EventType.ATTEMPT_FAILED)
    assert retried == len(sim.raised) - (1 if sim.failing is not None else 0)

    instances = [
        Instance(e.instance or 0, e.step_index or 0, e.iteration or 0, e.handler_iteration)
        for e in events
        if e.type is EventType.SUSPENDED and e.phase in (Phase.STEP, Phase.HANDLER)
    ]
    attempted = sim.compensated

    if finish.status == "committed":
        assert finish == Finish("committed")
        assert EventType.ROLLING_BACK not in [e.type for e in events]
        assert attempted == []
        assert steps_done[-1].step_index == len(sim.steps) - 1
        return

    [start] = [i for i, e in enumerate(events) if e.type is EventType.ROLLING_BACK]
    happy, rollback = events[:start], events[start + 1 : -1]
    assert all(e.phase in (Phase.STEP, Phase.HANDLER, None) for e in happy)
    assert all(e.phase in (Phase.CHILDREN, Phase.COMPENSATION) for e in rollback)
    assert finish.failure == events[start].failure

    # The instance that failed is the newest and never committed, so never compensated.
    if sim.failing is not None:
        assert all(i.seq < sim.failing.seq for i in instances)
        assert sim.failing.seq not in {i.seq for i in attempted}

    # Compensations: committed step instances with a compensation, newest first, each at
    # most once; only a failing compensation or giving up stops them.
    expected = [
        i
        for i in reversed(instances)
        if i.handler is None and sim.steps[i.step].compensate is not None
    ]
    assert attempted == expected[: len(attempted)]
    if sim.compensation_failures:
        assert sim.compensation_failures == [attempted[-1]]
        assert finish.status == "rollback_failed"
    last = events[-1].failure
    gave_up = last is not None and last.type == GaveUp.wire_type
    halted = bool(sim.compensation_failures) or gave_up
    if not halted:
        assert attempted == expected
        # Every instance had its children rolled back, then (a step's) compensation ran.
        plan: list[tuple[Phase, int, int, int | None]] = []
        for i in reversed(instances):
            plan.append((Phase.CHILDREN, i.step, i.iteration, i.handler))
            if i.handler is None:
                plan.append((Phase.COMPENSATION, i.step, i.iteration, None))
        done = [(e.phase, e.step_index, e.iteration, e.handler_iteration) for e in rollback]
        assert done == plan
        assert events[-1].step == f"Rollback of {sim.steps[0].name}"

    if finish.status == "rolled_back":
        assert not sim.compensation_failures
        assert finish.rollback_failure is None
    else:
        assert halted or sim.child_rollback_failures
        failure = finish.rollback_failure
        assert failure is not None
        assert failure.type == RollbackFailed.wire_type
        assert failure.causes[-1] == finish.failure
        if halted:
            assert failure.causes[0] == last


@pytest.mark.parametrize("chunk", range(8))
def test_random_sagas_keep_the_invariants(chunk: int) -> None:
    for seed in range(chunk * 50, chunk * 50 + 50):
        sim = RandomSim(seed)
        try:
            sim.run(max_transactions=300)
            check_invariants(sim)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}: {exc}") from exc


def test_random_sagas_with_a_deadline_passing_mid_transaction_keep_the_invariants() -> None:
    for seed in range(400):
        sim = RandomSim(seed, mid_transaction_deadline=True)
        try:
            sim.run(max_transactions=300)
            check_invariants(sim)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}: {exc}") from exc


def test_random_sagas_reach_every_ending() -> None:
    endings = {RandomSim(seed).run(max_transactions=300).status for seed in range(400)}
    assert endings == {"committed", "rolled_back", "rollback_failed"}
