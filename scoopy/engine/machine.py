"""The run state machine: what a run does next, given its state and what happened. No I/O.

A run is driven by the runner in a loop inside one transaction:

    transition = machine.resume(state, wake)
    while the action is not Wait/Finish:
        perform the action (user code, or bookkeeping in the database)
        transition = machine.after_<action>(state, action, outcome)   # -> Again
        transition = machine.resume(state, updated wake)

`resume` is a pure function of the persisted state and the wake-up facts, so a run that
stops between two actions (commit, crash) resumes exactly where it left off.

(Over 600 lines on purpose: the whole machine reads and writes one `RunState`, and having
every transition in one place is what lets it be checked against the seeds' orderings.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal, NamedTuple, Protocol

import msgspec

from ..errors import SagaDefinitionError
from ..failure import (
    NO_MESSAGE,
    ChildRollbackFailed,
    ChildRolledBack,
    CooperationError,
    CooperationFailure,
    GaveUp,
    RetriesExhausted,
    RollbackFailed,
)
from ..saga import NextStep

CHILD_SCOPES = " (rolling back child scopes)"


class EventType(StrEnum):
    EMITTED = "EMITTED"
    SEEN = "SEEN"
    SUSPENDED = "SUSPENDED"
    COMMITTED = "COMMITTED"
    ROLLING_BACK = "ROLLING_BACK"
    ROLLBACK_EMITTED = "ROLLBACK_EMITTED"
    ROLLED_BACK = "ROLLED_BACK"
    ROLLBACK_FAILED = "ROLLBACK_FAILED"
    CANCELLATION_REQUESTED = "CANCELLATION_REQUESTED"
    ATTEMPT_FAILED = "ATTEMPT_FAILED"


class Phase(StrEnum):
    """What a SUSPENDED event closed: a step, a child-failure handler, or a rollback sub-step."""

    STEP = "step"
    HANDLER = "handler"
    CHILDREN = "rollback_children"
    COMPENSATION = "compensation"


class StepShape(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def compensate(self) -> object | None: ...


class Instance(msgspec.Struct, frozen=True, array_like=True):
    """A committed happy-path step instance: what rollback has to undo."""

    seq: int
    step: int
    iteration: int
    handler: int | None = None  # set for on_child_failure instances


class RunState(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The persisted cursor of one run (stored as JSON in `run.state`)."""

    path: Literal["happy", "rollback"] = "happy"
    seq: int = 0  # number of the latest instance or rollback sub-step
    step: int | None = 0  # next step to run; None once every step is done
    reached: int = 0  # the furthest step that committed: what identifies the run's position
    goto: str | None = None  # an operator's `move`: the step (by name) to go on with
    iteration: int = 0  # iteration of the next step
    last: int | None = None  # step of the latest instance (whose children we wait for)
    last_iteration: int = 0
    step_instance: int = 0  # instance of the latest step (its handlers' instances follow it)
    handlers: int = 0  # on_child_failure invocations for the latest step
    attempt: int = 1  # attempt number of the next step
    attempts: list[CooperationFailure] = []
    resume_at: datetime | None = None  # asked for by the step (sleep) or a retry backoff
    suspended_at: datetime | None = None  # when the latest instance finished
    origin: Literal["self", "parent", "external"] | None = None
    cause: CooperationFailure | None = None
    plan: list[Instance] | None = None  # instances still to roll back, newest first
    children_done: bool = False  # the head of the plan has had its children rolled back
    errors: list[CooperationFailure] = []  # rollback failures seen so far


class ChildOutcome(NamedTuple):
    """A child of the current wait that did not simply succeed."""

    saga: str
    run_id: str
    status: str
    failure: CooperationFailure | None  # its own failure, if it failed by itself
    rollback_failure: CooperationFailure | None


@dataclass(frozen=True, slots=True)
class Wake:
    """The facts a run is resumed with."""

    now: datetime
    pending: int = 0
    child_failures: tuple[ChildOutcome, ...] = ()
    history: tuple[Instance, ...] | None = None
    give_up: CooperationFailure | None = None  # the strategy's reason to give up now
    resume_at: datetime | None = None  # the strategy's earliest time to resume
    detach: bool = False  # the strategy stopped waiting for children that have not started


class EventSpec(NamedTuple):
    type: EventType
    step: str | None = None
    phase: Phase | None = None
    step_index: int | None = None
    instance: int | None = None
    iteration: int | None = None
    handler_iteration: int | None = None
    failure: CooperationFailure | None = None


# -- actions -------------------------------------------------------------------------------


class Invoke(NamedTuple):
    step: int
    iteration: int
    attempt: int
    seq: int


class HandleChildren(NamedTuple):
    step: int
    failure: CooperationFailure
    handler_iteration: int
    seq: int
    tainted: tuple[CooperationFailure, ...]  # children's rollback failures inside `failure`


class Compensate(NamedTuple):
    instance: Instance
    seq: int
    cause: CooperationFailure


class RollbackChildren(NamedTuple):
    instance: Instance
    seq: int


class SkipUnstarted(NamedTuple):
    """Give up on children that have not started: they will never run."""


class DetachUnstarted(NamedTuple):
    """Stop waiting for children that have not started: they run outside the hierarchy."""


class NeedHistory(NamedTuple):
    """Load the run's committed instances, then resume again."""


class Again(NamedTuple):
    """Resume again with the updated state."""


class Wait(NamedTuple):
    """Stop here; claimable again at `until` (None: when the children finish)."""

    until: datetime | None = None


class Finish(NamedTuple):
    status: Literal["committed", "rolled_back", "rollback_failed"]
    failure: CooperationFailure | None = None  # the run's own failure (why it rolled back)
    rollback_failure: CooperationFailure | None = None


Action = (
    Invoke
    | HandleChildren
    | Compensate
    | RollbackChildren
    | SkipUnstarted
    | DetachUnstarted
    | NeedHistory
    | Again
    | Wait
    | Finish
)

USER_CODE = (Invoke, HandleChildren, Compensate)


@dataclass(frozen=True, slots=True)
class Transition:
    state: RunState
    action: Action
    events: list[EventSpec] = field(default_factory=list)


def _framework_failure(
    kind: type[CooperationError], message: str, source: str, causes: Sequence[CooperationFailure]
) -> CooperationFailure:
    return CooperationFailure(
        type=kind.wire_type, message=message, source=source, causes=list(causes)
    )


class Machine:
    """Transitions for the runs of one saga; `source` names the run in failures it creates."""

    def __init__(self, steps: Sequence[StepShape], saga: str, source: str) -> None:
        self.steps = steps
        self.saga = saga
        self.source = source

    # -- naming ----------------------------------------------------------------------------

    def name(self, index: int | None) -> str:
        return self.steps[index if index is not None else 0].name

    def rollback_name(self, index: int | None, children: bool = False) -> str:
        return f"Rollback of {self.name(index)}" + (CHILD_SCOPES if children else "")

    # -- control flow ----------------------------------------------------------------------

    def next_of(self, step: int, iteration: int, nxt: NextStep | None) -> tuple[int | None, int]:
        """The step and iteration that follow `step` when it returns `nxt`."""
        if nxt is None or nxt.kind == "continue":
            following = step + 1
            return (following if following < len(self.steps) else None), 0
        if nxt.kind == "repeat":
            return step, iteration + 1
        for candidate in self.steps:
            if candidate.name == nxt.target:
                index = self.steps.index(candidate)
                return index, (iteration + 1 if index == step else 0)
        raise SagaDefinitionError(f"saga {self.saga!r} has no step {nxt.target!r} to go to")

    # -- resuming --------------------------------------------------------------------------

    def resume(self, state: RunState, wake: Wake) -> Transition:
        if state.path == "happy":
            return self._resume_happy(state, wake)
        return self._resume_rollback(state, wake)

    def _waiting(self, s: RunState, w: Wake) -> Transition:
        if w.give_up is not None:
            return Transition(s, SkipUnstarted())
        if w.detach:
            return Transition(s, DetachUnstarted())
        return Transition(s, Wait())

    def _resume_happy(self, s: RunState, w: Wake) -> Transition:
        if w.pending > 0:
            return self._waiting(s, w)
        if w.child_failures:
            failure, tainted = self.children_failure(s.last, w.child_failures)
            if w.give_up is not None:
                return self.fail(
                    s, self.gave_up(w.give_up, failure), s.last, s.last_iteration, tainted
                )
            assert s.last is not None
            return Transition(
                s, HandleChildren(s.last, failure, s.handlers, s.seq + 1, tuple(tainted))
            )
        if w.give_up is not None:
            if s.step is not None:
                return self.fail(s, self.gave_up(w.give_up), s.step, s.iteration)
            return self.fail(s, self.gave_up(w.give_up), s.last, s.last_iteration)
        # What the run asked for (sleep, retry backoff) holds whatever the strategy says;
        # the strategy can only add to it.
        until = max((t for t in (s.resume_at, w.resume_at) if t is not None), default=None)
        if until is not None and until > w.now:
            return Transition(s, Wait(until))
        if s.step is None:
            committed = EventSpec(EventType.COMMITTED, step=self.name(s.last))
            return Transition(s, Finish("committed"), [committed])
        return Transition(s, Invoke(s.step, s.iteration, s.attempt, s.seq + 1))

    def _resume_rollback(self, s: RunState, w: Wake) -> Transition:
        if w.pending > 0:
            return self._waiting(s, w)
        if w.child_failures:
            s = msgspec.structs.replace(
                s, errors=[*s.errors, *self.rollback_errors(w.child_failures)]
            )
        if s.plan is None:
            if w.history is None:
                return Transition(s, NeedHistory())
            s = msgspec.structs.replace(s, plan=list(reversed(w.history)), children_done=False)
        assert s.plan is not None
        if not s.plan:
            return self._finish_rollback(s)  # complete: a deadline passing now changes nothing
        head = s.plan[0]
        if w.give_up is not None:
            # Named after the sub-step that will not run.
            where = self.rollback_name(head.step, children=not s.children_done)
            return self._halt(s, self.gave_up(w.give_up), where)
        if not s.children_done:
            return Transition(s, RollbackChildren(head, s.seq + 1))
        if self.steps[head.step].compensate is None:
            # Nothing to run, but the sub-step is still recorded so the log reads the same.
            done = self.after_compensation(s, Compensate(head, s.seq + 1, self._cause(s)))
            return Transition(done.state, Again(), done.events)
        return Transition(s, Compensate(head, s.seq + 1, self._cause(s)))

    def _cause(self, s: RunState) -> CooperationFailure:
        if s.cause is not None:
            return s.cause
        return _framework_failure(GaveUp, NO_MESSAGE, self.source, [])

    def _finish_rollback(self, s: RunState) -> Transition:
        name = self.rollback_name(s.last)
        own = s.cause if s.origin != "parent" else None
        if not s.errors:
            return Transition(
                s, Finish("rolled_back", own), [EventSpec(EventType.ROLLED_BACK, step=name)]
            )
        failure = (
            s.errors[0]
            if len(s.errors) == 1
            else _framework_failure(
                ChildRollbackFailed,
                "Child rollback failure occurred while rolling back",
                self.source,
                s.errors,
            )
        )
        event = EventSpec(EventType.ROLLBACK_FAILED, step=name, failure=failure)
        return Transition(
            s, Finish("rollback_failed", own, self._rollback_failure(s, s.errors)), [event]
        )

    def _rollback_failure(
        self, s: RunState, primary: Sequence[CooperationFailure]
    ) -> CooperationFailure:
        """What failed first, then (unless the parent asked for the rollback) why we rolled back.

        A failure already inside the cause (a child's rollback failure that made us roll
        back) is reported once, inside the cause.
        """
        causes = list(primary)
        if s.cause is not None and s.origin != "parent":
            inside = s.cause.walk()[1:]
            causes = [failure for failure in causes if failure not in inside]
            causes.append(s.cause)
        return _framework_failure(
            RollbackFailed, f"Rollback of {self.saga} failed", self.source, causes
        )

    def _halt(self, s: RunState, failure: CooperationFailure, step: str) -> Transition:
        """The rollback cannot go on: record it and stop (earlier steps stay uncompensated)."""
        own = s.cause if s.origin != "parent" else None
        event = EventSpec(EventType.ROLLBACK_FAILED, step=step, failure=failure)
        return Transition(
            s,
            Finish("rollback_failed", own, self._rollback_failure(s, [failure, *s.errors])),
            [event],
        )

    # -- failures --------------------------------------------------------------------------

    def gave_up(
        self, reason: CooperationFailure, also: CooperationFailure | None = None
    ) -> CooperationFailure:
        causes = [reason] if also is None else [reason, also]
        return _framework_failure(GaveUp, f"Gave up: {reason.message}", self.source, causes)

    def children_failure(
        self, step: int | None, children: Sequence[ChildOutcome]
    ) -> tuple[CooperationFailure, list[CooperationFailure]]:
        """The failure a parent sees for failed children, and the rollback failures in it."""
        rolled_back = [c.failure for c in children if c.failure is not None]
        rollback_failed = [c.rollback_failure for c in children if c.rollback_failure is not None]
        where = self.name(step)
        if not rollback_failed:
            return _framework_failure(
                ChildRolledBack,
                f"Child failure occurred while suspended in step [{where}]",
                self.source,
                rolled_back,
            ), []
        causes = list(rollback_failed)
        # A child that failed to roll back reports its original failure inside its rollback
        # failure already; only children that rolled back cleanly are added here.
        clean = [
            c.failure for c in children if c.failure is not None and c.rollback_failure is None
        ]
        if clean:
            causes.append(_framework_failure(ChildRolledBack, NO_MESSAGE, self.source, clean))
        return _framework_failure(
            ChildRollbackFailed,
            f"Child rollback failure occurred while suspended in step [{where}]",
            self.source,
            causes,
        ), list(rollback_failed)

    def rollback_errors(self, children: Sequence[ChildOutcome]) -> list[CooperationFailure]:
        """Failures of children waited for during a rollback: none of them is swallowed."""
        errors: list[CooperationFailure] = []
        for child in children:
            if child.rollback_failure is not None:
                errors.append(child.rollback_failure)
            elif child.failure is not None:
                errors.append(
                    _framework_failure(
                        ChildRolledBack,
                        "Child failure occurred while rolling back",
                        self.source,
                        [child.failure],
                    )
                )
        return errors

    def fail(
        self,
        s: RunState,
        failure: CooperationFailure,
        step: int | None,
        iteration: int | None,
        tainted: Sequence[CooperationFailure] = (),
    ) -> Transition:
        """Leave the happy path at `step`'s `iteration`: record the failure, start rolling back."""
        event = EventSpec(
            EventType.ROLLING_BACK,
            step=self.name(step),
            step_index=step,
            iteration=iteration,
            failure=failure,
        )
        rolled = msgspec.structs.replace(
            s,
            path="rollback",
            origin="self",
            cause=failure,
            plan=None,
            children_done=False,
            errors=list(tainted),
            resume_at=None,
            attempt=1,
            attempts=[],
        )
        return Transition(rolled, Again(), [event])

    def rollback_requested(
        self, s: RunState, cause: CooperationFailure, origin: Literal["parent", "external"]
    ) -> RunState:
        """The state of a finished run whose parent (or an operator) asked it to roll back."""
        return msgspec.structs.replace(
            s,
            path="rollback",
            origin=origin,
            cause=cause,
            plan=None,
            children_done=False,
            errors=[],
            resume_at=None,
        )

    # -- after actions ---------------------------------------------------------------------

    def after_invoke(
        self,
        s: RunState,
        act: Invoke,
        next_step: tuple[int | None, int],
        sleep_until: datetime | None = None,
        now: datetime | None = None,
    ) -> Transition:
        event = EventSpec(
            EventType.SUSPENDED,
            step=self.name(act.step),
            phase=Phase.STEP,
            step_index=act.step,
            instance=act.seq,
            iteration=act.iteration,
        )
        following, iteration = next_step
        state = msgspec.structs.replace(
            s,
            seq=act.seq,
            last=act.step,
            reached=max(s.reached, act.step),
            last_iteration=act.iteration,
            step_instance=act.seq,
            step=following,
            iteration=iteration,
            handlers=0,
            attempt=1,
            attempts=[],
            resume_at=sleep_until,
            suspended_at=now,
        )
        return Transition(state, Again(), [event])

    def step_failed(
        self,
        s: RunState,
        act: Invoke,
        failure: CooperationFailure,
        retry_in: float | None,
        now: datetime,
        exhausted: bool | None = None,
    ) -> Transition:
        """The step raised: retry it later if the policy says so, else roll back.

        `exhausted` says the policy would have retried this failure but ran out of attempts
        (then the failure lists every attempt); None means "if there were earlier attempts".
        """
        if retry_in is not None:
            event = EventSpec(
                EventType.ATTEMPT_FAILED,
                step=self.name(act.step),
                step_index=act.step,
                iteration=act.iteration,
                failure=failure,
            )
            state = msgspec.structs.replace(
                s,
                attempt=act.attempt + 1,
                attempts=[*s.attempts, failure],
                resume_at=now + timedelta(seconds=retry_in),
            )
            return Transition(state, Again(), [event])
        if exhausted if exhausted is not None else bool(s.attempts):
            failure = _framework_failure(
                RetriesExhausted,
                f"step {self.name(act.step)!r} failed after {act.attempt} attempts",
                self.source,
                [*s.attempts, failure],
            )
        return self.fail(s, failure, act.step, act.iteration)

    def after_handler(
        self,
        s: RunState,
        act: HandleChildren,
        next_step: tuple[int | None, int] | None,
        now: datetime | None = None,
    ) -> Transition:
        """The child-failure handler returned: the failure is handled and consumed."""
        event = EventSpec(
            EventType.SUSPENDED,
            step=self.name(act.step),
            phase=Phase.HANDLER,
            step_index=act.step,
            instance=act.seq,
            iteration=s.last_iteration,
            handler_iteration=act.handler_iteration,
        )
        following, iteration = next_step if next_step is not None else (s.step, s.iteration)
        state = msgspec.structs.replace(
            s,
            seq=act.seq,
            step=following,
            iteration=iteration,
            handlers=act.handler_iteration + 1,
            suspended_at=now,
        )
        return Transition(state, Again(), [event])

    def handler_failed(
        self, s: RunState, act: HandleChildren, failure: CooperationFailure
    ) -> Transition:
        return self.fail(s, failure, act.step, s.last_iteration, act.tainted)

    def after_rollback_children(self, s: RunState, act: RollbackChildren) -> Transition:
        inst = act.instance
        event = EventSpec(
            EventType.SUSPENDED,
            step=self.rollback_name(inst.step, children=True),
            phase=Phase.CHILDREN,
            step_index=inst.step,
            instance=act.seq,
            iteration=inst.iteration,
            handler_iteration=inst.handler,
        )
        assert s.plan is not None
        handler_instance = inst.handler is not None
        state = msgspec.structs.replace(
            s,
            seq=act.seq,
            last=inst.step,
            plan=s.plan[1:] if handler_instance else s.plan,
            children_done=not handler_instance,
        )
        return Transition(state, Again(), [event])

    def after_compensation(
        self, s: RunState, act: Compensate, now: datetime | None = None
    ) -> Transition:
        inst = act.instance
        event = EventSpec(
            EventType.SUSPENDED,
            step=self.rollback_name(inst.step),
            phase=Phase.COMPENSATION,
            step_index=inst.step,
            instance=act.seq,
            iteration=inst.iteration,
        )
        assert s.plan is not None
        state = msgspec.structs.replace(
            s, seq=act.seq, last=inst.step, plan=s.plan[1:], children_done=False, suspended_at=now
        )
        return Transition(state, Again(), [event])

    def compensation_failed(
        self, s: RunState, act: Compensate, failure: CooperationFailure
    ) -> Transition:
        state = msgspec.structs.replace(s, seq=act.seq, last=act.instance.step)
        return self._halt(state, failure, self.rollback_name(act.instance.step))
