"""A simulated runner for the run state machine (`scoopy.engine.machine`), without a database.

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

The tests that drive it are tests/test_machine_*.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

import msgspec

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
from scoopy.failure import CooperationError, CooperationFailure
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


def _instance(
    step: str, phase: Phase, index: int, instance: int, iteration: int, handler: int | None = None
) -> EventSpec:
    """The SUSPENDED event of one instance: of a step, a handler or a rollback sub-step."""
    return EventSpec(EventType.SUSPENDED, step, phase, index, instance, iteration, handler)


def suspended(step: str, index: int, instance: int, iteration: int = 0) -> EventSpec:
    return _instance(step, Phase.STEP, index, instance, iteration)


def handled(step: str, index: int, instance: int, handler: int, iteration: int = 0) -> EventSpec:
    return _instance(step, Phase.HANDLER, index, instance, iteration, handler)


def rolling_back(
    step: str, index: int, failure: CooperationFailure, iteration: int | None = 0
) -> EventSpec:
    return EventSpec(
        EventType.ROLLING_BACK, step=step, step_index=index, iteration=iteration, failure=failure
    )


def children_rolled_back(
    step: str, index: int, instance: int, iteration: int = 0, handler: int | None = None
) -> EventSpec:
    name = f"Rollback of {step} (rolling back child scopes)"
    return _instance(name, Phase.CHILDREN, index, instance, iteration, handler)


def compensated(step: str, index: int, instance: int, iteration: int = 0) -> EventSpec:
    return _instance(f"Rollback of {step}", Phase.COMPENSATION, index, instance, iteration)


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
