"""One step transaction: the per-transaction interpreter of a claimed run.

`StepTransaction.advance` loops inside one open transaction:

    transition = machine.resume(state, wake)
    until the action is Wait or Finish:
        perform it (the user's step, handler or compensation; or bookkeeping in the database)
        transition = the machine's answer to what happened

then writes the run's new state and events in one statement (`Store.finish`). At most one
piece of user code runs per transaction. The caller commits (see `runner.Runner.advance`).

(Over 600 lines on purpose: every method works on the state of the one open transaction —
the run, its context, its buffered events and notifications — and splitting them apart
would mean handing that state around; the pieces that stand alone are in `eventlog`,
`faults`, `definition` and `records`.)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import anyio
import asyncpg
import msgspec

from ..context import CooperationContext
from ..failure import (
    NO_MESSAGE,
    CooperationFailure,
    GaveUp,
    ParentSaidSo,
    failure_from_exception,
)
from ..message import Message, Topic
from ..scope import Scope, in_scope
from ..strategy import RunView
from ..vocab import ACTIVE, COMMITTED, HAPPY, PENDING, ROLLBACK, Connection, Path
from .definition import Untranslatable, translate
from .eventlog import TransactionEvents, failure_text, text
from .faults import DB_TRANSIENT, CancelledMeanwhile, KeyRaced, Redo, gone
from .machine import (
    USER_CODE,
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
    RollbackChildren,
    RunState,
    SkipUnstarted,
    Transition,
    Wait,
    Wake,
)
from .records import AfterCommit, Binding, Claimed, RollbackRequest, RunWrite
from .store import Store
from .topology import KnownDefinitions, TopologyStore

_state_decoder = msgspec.json.Decoder(RunState)
_state_encoder = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(RollbackRequest)


@dataclass(frozen=True, slots=True)
class StepSettings:
    """What every step transaction of one worker needs to know about that worker."""

    store: Store
    worker: str
    listen: bool
    max_depth: int
    max_recursion: int
    bindings: dict[str, Binding]  # shared with the Cooperation: sagas subscribed later appear
    definitions: KnownDefinitions
    topology: TopologyStore


SETTLE_DEPTH = 16


class StepTransaction:
    """One transaction's worth of progress for one claimed run.

    The machine decides what the run does next; this does it: runs the user's code, writes
    what the code launched and the run's bookkeeping, and reports what it did (`AfterCommit`).
    """

    def __init__(
        self,
        settings: StepSettings,
        conn: Connection,
        binding: Binding,
        claimed: Claimed,
        injected: tuple[BaseException, CooperationContext | None] | None = None,
        settling: int = 0,
    ):
        self.settings = settings
        self.store = settings.store
        self.conn = conn
        self.binding = binding
        self.saga = binding.saga
        self.strategy = binding.strategy
        self.run = claimed
        self.source = f"{self.saga.name}[{claimed.id}]"
        if claimed.topic is None or claimed.payload is None:
            # Deleted by hand (nothing in scoopy deletes messages): this run cannot be
            # advanced, and is deferred like any run that cannot, so others go on.
            raise RuntimeError(f"the message {claimed.message_id} of run {self.source} is gone")
        self.topic_name: str = claimed.topic
        self.payload_text: str = claimed.payload
        self.machine = Machine(self.saga.steps, self.saga.name, self.source)
        self.context = CooperationContext.decode(claimed.context)
        self.cancellation = (
            None
            if claimed.cancellation is None
            else CooperationFailure.from_json(claimed.cancellation)
        )
        self.started_at = time.monotonic()
        self.events = TransactionEvents(claimed, self.saga.name)
        self.notify: list[str] = []
        self.ready_sagas: set[str] = set()
        self.message: Message[Any] | None = None
        self.pending = claimed.pending
        self.reset_failed = False
        self.result: str | None = None
        self.touched = False
        self.ran_happy_code = False  # a step or handler ran (and may not commit if cancelled)
        self.injected = injected  # a failure recorded before a redo, replayed as the user code
        self.settling = settling  # how many descendants' transaction this is
        self.state = _state_decoder.decode(claimed.state)

    # -- helpers ---------------------------------------------------------------------------

    def now(self) -> datetime:
        return self.run.now + timedelta(seconds=time.monotonic() - self.started_at)

    def view(self, state: RunState, now: datetime | None = None) -> RunView:
        return RunView(
            run_id=str(self.run.id),
            saga=self.saga.name,
            path=state.path,
            now=now or self.now(),
            context=self.context,
            cancellation=self.cancellation,
            sleep_until=state.resume_at,
            suspended_at=state.suspended_at,
            waiting=self.pending > 0,
        )

    def add(self, spec: EventSpec) -> None:
        self.events.transition(spec, self.context.encode())

    def wake(
        self,
        state: RunState,
        child_failures: tuple[ChildOutcome, ...] = (),
        history: tuple[Instance, ...] | None = None,
    ) -> Wake:
        """The facts to resume with; every decision about time is the strategy's."""
        view = self.view(state)
        strategy = self.strategy
        return Wake(
            now=view.now,
            pending=self.pending,
            child_failures=child_failures,
            history=history,
            give_up=strategy.give_up(view),
            resume_at=strategy.resume_at(view),
            detach=self.pending > 0 and strategy.detach_unstarted(view),
        )

    def topic(self) -> Topic[Any]:
        return self.binding.topic(self.topic_name)

    def payload(self) -> Message[Any]:
        if self.message is None:
            self.message = Message(
                self.run.message_id, self.topic_name, self.topic().decode(self.payload_text)
            )
        return self.message

    # -- the loop --------------------------------------------------------------------------

    def position(self, step: str) -> int:
        """Where the step called `step` (now or under an alias) is in this worker's saga."""
        found = self.binding.definition.index_of(step)
        if found is None:
            raise Untranslatable(f"step {step!r} is not in the definition this worker runs")
        return found

    async def adopt(self) -> None:
        """Count the run's cursor in this worker's definition if it started under another.

        The claim only hands over runs whose reached steps this definition shares (or that
        an operator released); what lies after their position is translated by name.
        """
        mine = self.binding.definition
        if self.run.definition is not None and self.run.definition != mine.fingerprint:
            old = await self.settings.definitions.get(
                self.conn, self.saga.name, self.run.definition
            )
            if old is None:
                raise Untranslatable(f"its definition {self.run.definition} was never registered")
            self.state = translate(self.state, old, mine)
        if self.state.goto is not None:  # an operator moved the run to a step by name
            step = self.position(self.state.goto)
            reached = max(self.state.reached, self.state.last or 0)
            if self.state.last is not None and step <= reached:
                again = mine.steps[reached].name
                raise Untranslatable(
                    f"going on with {self.state.goto!r} would run {again!r} again, which "
                    "committed already: move it to a later step, or roll it back"
                )
            self.state = msgspec.structs.replace(self.state, step=step, iteration=0, goto=None)

    async def advance(self) -> AfterCommit:
        await self.adopt()
        state = self.state
        if self.run.status == PENDING:
            self.add(EventSpec(EventType.SEEN))
        if self.run.rollback_request is not None:
            request = _request_decoder.decode(self.run.rollback_request)
            state = self.machine.rollback_requested(state, request.cause, request.origin)
            self.add(EventSpec(EventType.ROLLING_BACK, failure=request.cause))

        failures: tuple[ChildOutcome, ...] = ()
        if self.pending == 0 and self.run.failed > 0:
            rows = await self.store.child_failures(self.conn, self.run.id, state.seq)
            failures = tuple(
                ChildOutcome(
                    row.saga,
                    str(row.id),
                    row.status,
                    None if row.failure is None else CooperationFailure.from_json(row.failure),
                    None
                    if row.rollback_failure is None
                    else CooperationFailure.from_json(row.rollback_failure),
                )
                for row in rows
            )
            self.reset_failed = True

        history: tuple[Instance, ...] | None = None
        transition = self.machine.resume(state, self.wake(state, child_failures=failures))
        ran_user_code = False
        while True:
            state = self.state = transition.state  # give_up_if_needed judges the current path
            for spec in transition.events:
                self.add(spec)
            action = transition.action
            if isinstance(action, USER_CODE) and ran_user_code:
                # One piece of user code per transaction; the next runs in a fresh one.
                return await self.finish(state, ready_at=self.run.now)
            if isinstance(action, Again):
                transition = self.machine.resume(state, self.wake(state, history=history))
            elif isinstance(action, NeedHistory):
                done = await self.store.history(self.conn, self.run.root_id, self.run.id)
                history = (
                    tuple(
                        Instance(
                            r.instance, self.position(r.step), r.iteration, r.handler_iteration
                        )
                        for r in done
                    )
                    + self.events.committed_instances()
                )
                transition = self.machine.resume(state, self.wake(state, history=history))
            elif isinstance(action, Invoke):
                transition = await self.invoke(state, action)
                ran_user_code = True
            elif isinstance(action, HandleChildren):
                transition = await self.handle_children(state, action)
                ran_user_code = self.saga.steps[action.step].child_failure is not None
            elif isinstance(action, Compensate):
                transition = await self.compensate(state, action)
                ran_user_code = True
            elif isinstance(action, RollbackChildren):
                transition = await self.rollback_children(state, action)
            elif isinstance(action, (SkipUnstarted, DetachUnstarted)):
                if isinstance(action, SkipUnstarted):
                    released = await self.store.skip_unstarted(self.conn, self.run.id)
                else:
                    released = await self.store.detach_unstarted(self.conn, self.run.id)
                self.pending -= released
                if self.pending > 0:
                    # The children that did start are waited for; they finish on their own.
                    return await self.finish(state, ready_at=self.wait_until(state, Wait()))
                transition = self.machine.resume(state, self.wake(state))
            elif isinstance(action, Wait):
                return await self.finish(state, ready_at=self.wait_until(state, action))
            else:
                return await self.finish(state, ready_at=None, final=action)

    def wait_until(self, state: RunState, action: Wait) -> datetime | None:
        wake = self.strategy.wake_at(self.view(state))
        if wake is not None and wake <= self.now():
            wake = None  # already acted on: waking for it again would only spin
        if self.pending > 0:
            return wake
        candidates = [t for t in (action.until, wake) if t is not None]
        return min(candidates) if candidates else self.run.now

    # -- services for the Scope ------------------------------------------------------------

    async def give_up_check(self) -> None:
        cancellation, db_now = await self.store.cancellation_of(self.conn, self.run.lineage)
        if cancellation is not None:
            self.cancellation = CooperationFailure.from_json(cancellation)
        reason = self.strategy.give_up(self.view(self.state, now=db_now))
        if reason is not None:
            raise GaveUp(self.machine.gave_up(reason))

    async def child_results(self, instance: int) -> list[tuple[str, str, str]]:
        return await self.store.child_results(self.conn, self.run.id, instance)

    async def saga_in_lineage(self) -> int:
        return await self.store.saga_in_lineage(self.conn, self.run.lineage, self.saga.name)

    async def message_by_key(self, key: str) -> uuid.UUID | None:
        return await self.store.message_by_key(self.conn, key)

    # -- user code -------------------------------------------------------------------------

    def scope(
        self,
        step: str,
        iteration: int,
        attempt: int,
        instance: int,
        handler_iteration: int | None = None,
    ) -> Scope:
        return Scope(
            run_id=self.run.id,
            root_id=self.run.root_id,
            lineage=self.run.lineage,
            saga=self.saga.name,
            step=step,
            iteration=iteration,
            attempt=attempt,
            instance=instance,
            handler_iteration=handler_iteration,
            context=self.context,
            connection=self.conn,
            topic=self.topic(),
            own_topics=set(self.binding.topics),
            max_depth=self.settings.max_depth,
            max_recursion=self.settings.max_recursion,
            services=self,
        )

    async def user_code(
        self, scope: Scope, call: Callable[[], Any], path: Path
    ) -> tuple[Any, BaseException | None]:
        """Run user code; on failure return the error with none of its writes left.

        No savepoint is paid for: code that failed before touching `scope.connection` wrote
        nothing, and code that failed after touching it makes the whole transaction redo
        (`Redo`). A run that ran out of time during the code gives up inside the same
        transaction, so the overrunning work is discarded rather than committed.
        """
        if self.injected is not None:
            (error, context), self.injected = self.injected, None
            if context is not None:
                self.context = context  # what the failed code set, as if it had not written
            return None, error
        self.ran_happy_code = path == HAPPY
        try:
            with in_scope(scope):
                result = await call()
                state = msgspec.structs.replace(self.state, path=path)
                reason = self.strategy.give_up(self.view(state))
                if reason is not None:
                    raise GaveUp(self.machine.gave_up(reason))
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            if isinstance(exc, DB_TRANSIENT) or gone(self.conn):
                raise
            if scope.touched:
                raise Redo(exc, self.context.copy()) from exc
            return None, exc
        self.touched = self.touched or scope.touched
        if scope.launches:
            await self.emit(scope)
        if scope.result is not None:
            self.result = scope.result
        return result, None

    async def emit(self, scope: Scope) -> None:
        try:
            inserted, created = await self.store.emit(self.conn, scope.launches, self.run)
        except asyncpg.PostgresError as exc:
            # User code swallowed an SQL error, or what it launched broke a constraint.
            if isinstance(exc, DB_TRANSIENT):
                raise
            raise Redo(exc) from exc
        for launch in scope.launches:
            if launch.key is not None and launch.id not in inserted:
                raise KeyRaced(f"launch key {launch.key!r} was taken while {self.source} ran")
        children = {launch.id for launch in scope.launches if launch.scoped}
        self.pending += sum(1 for message_id, _ in created if message_id in children)
        for _, saga in created:
            self.notify_saga(saga)
        for launch in scope.launches:
            if launch.id not in inserted:
                continue  # its key was taken by a concurrent launch
            self.events.emitted(launch, scope.step)

    def notify_saga(self, saga: str) -> None:
        if saga not in self.ready_sagas:
            self.ready_sagas.add(saga)
            self.notify.append("r:" + saga)

    async def invoke(self, state: RunState, act: Invoke) -> Transition:
        step = self.saga.steps[act.step]
        before = self.context.copy()
        scope = self.scope(step.name, act.iteration, act.attempt, act.seq)
        scope.previous_instance = state.step_instance

        async def call() -> tuple[int | None, int]:
            nxt = await step.invoke(scope, self.payload())
            return self.machine.next_of(act.step, act.iteration, nxt)

        following, error = await self.user_code(scope, call, HAPPY)
        if error is None:
            return self.machine.after_invoke(state, act, following, scope.resume_at, now=self.now())
        failure = failure_from_exception(error, self.source)
        retryable = (
            step.retry is not None
            and not isinstance(error, GaveUp)  # giving up is final, never retried
            and isinstance(error, step.retry.on)
        )
        retry_in = None
        if retryable and step.retry is not None and step.retry.retries(error, act.attempt):
            retry_in = step.retry.delay(act.attempt)
            self.context = before  # the failed attempt's context changes vanish with it
        # Giving up is reported as such; any other final failure lists the earlier attempts.
        exhausted = True if retryable and retry_in is None else None
        if isinstance(error, GaveUp):
            exhausted = False
        return self.machine.step_failed(state, act, failure, retry_in, self.now(), exhausted)

    async def handle_children(self, state: RunState, act: HandleChildren) -> Transition:
        step = self.saga.steps[act.step]
        handler = step.child_failure
        if handler is None:
            return self.machine.handler_failed(state, act, act.failure)
        scope = self.scope(
            step.name, state.last_iteration, 1, act.seq, handler_iteration=act.handler_iteration
        )
        scope.previous_instance = state.step_instance
        error = act.failure.to_exception()

        async def call() -> tuple[int | None, int] | None:
            nxt = await handler(scope, self.payload(), error)
            if nxt is None:
                return None
            return self.machine.next_of(act.step, state.last_iteration, nxt)

        following, raised = await self.user_code(scope, call, HAPPY)
        if raised is None:
            return self.machine.after_handler(state, act, following, now=self.now())
        return self.machine.handler_failed(state, act, failure_from_exception(raised, self.source))

    async def compensate(self, state: RunState, act: Compensate) -> Transition:
        step = self.saga.steps[act.instance.step]
        fn = step.compensate
        assert fn is not None
        scope = self.scope(f"Rollback of {step.name}", act.instance.iteration, 1, act.seq)
        cause = act.cause.to_exception()

        async def call() -> None:
            await fn(scope, self.payload(), cause)

        _, error = await self.user_code(scope, call, ROLLBACK)
        if error is None:
            return self.machine.after_compensation(state, act, now=self.now())
        return self.machine.compensation_failed(
            state, act, failure_from_exception(error, self.source)
        )

    # -- bookkeeping -----------------------------------------------------------------------

    async def rollback_children(self, state: RunState, act: RollbackChildren) -> Transition:
        cause = state.cause or CooperationFailure(
            type=GaveUp.wire_type, message=NO_MESSAGE, source=self.source
        )
        said_so = CooperationFailure(
            type=ParentSaidSo.wire_type, message=NO_MESSAGE, source=self.source, causes=[cause]
        )
        request = msgspec.json.encode(RollbackRequest("parent", said_so)).decode()
        context = text(self.context.encode())
        # Each child keeps its own context with the parent's on top; deadlines combine, so
        # a stricter one the child set survives a looser one of the parent.
        contexts = {
            child: text(CooperationContext.decode(own).merged(self.context).encode())
            for child, own in await self.store.committed_children(
                self.conn, self.run.id, act.instance.seq
            )
        }
        messages, sagas = await self.store.rollback_children(
            self.conn, self.run.id, act.instance.seq, act.seq, request, contexts
        )
        step_name = self.machine.rollback_name(act.instance.step, children=True)
        for message_id in messages:
            self.events.rollback_emitted(message_id, step_name, act.seq, said_so, context)
        for saga in sagas:
            self.notify_saga(saga)
        self.pending = len(sagas)
        return self.machine.after_rollback_children(state, act)

    async def finish(
        self,
        state: RunState,
        *,
        ready_at: datetime | None,
        final: Finish | None = None,
    ) -> AfterCommit:
        terminal = final is not None
        view = self.view(state)
        status = final.status if final is not None else ACTIVE
        parent_failed = int(
            final is not None
            and final.status != COMMITTED
            and (final.failure is not None or final.rollback_failure is not None)
        )
        notify_parent = terminal and self.run.awaited and self.run.parent_id is not None
        root_done = terminal and self.run.parent_id is None
        if root_done:
            self.notify.append(f"d:{self.run.root_id}")
        # A run nobody waits for inside its hierarchy (an undone sub-tree) is waited on by id.
        alone = terminal and self.run.parent_id is not None and not self.run.awaited
        if alone:
            self.notify.append(f"d:{self.run.id}")
        if ready_at is not None and not terminal:
            self.ready_sagas.add(self.saga.name)
        deadline = None if terminal else self.strategy.wake_at(view)
        if deadline is not None and deadline <= view.now:
            deadline = None  # already acted on
        write = RunWrite(
            run_id=self.run.id,
            lineage=self.run.lineage,
            status=status,
            state=_state_encoder.encode(state).decode(),
            pending=0 if terminal else self.pending,
            reset_failed=self.reset_failed,
            ready_at=None if terminal else ready_at,
            resume_at=None if terminal else state.resume_at,
            deadline_at=deadline,
            context=text(self.context.encode()),
            failure=failure_text(final.failure) if final is not None else None,
            rollback_failure=failure_text(final.rollback_failure) if final is not None else None,
            result=self.result,
            terminal=terminal,
            parent_id=self.run.parent_id,
            parent_failed=parent_failed,
            notify_parent=notify_parent,
            events=self.events.rows,
            notify=self.notify,
            sleeping=not terminal and state.path == HAPPY and self.pending == 0,
            definition=self.binding.definition.fingerprint,
            prefix=self.binding.definition.prefix_at(max(state.reached, state.last or 0)),
        )
        try:
            parent_saga, parent_pending, cancelled = await self.store.finish(
                self.conn, write, self.settings.worker, self.settings.listen
            )
        except asyncpg.exceptions.InFailedSQLTransactionError as exc:
            if not self.touched:
                raise
            raise Redo(exc) from exc  # user code swallowed an SQL error
        if cancelled and self.ran_happy_code and self.cancellation is None:
            raise CancelledMeanwhile(f"{self.source} was cancelled while its step ran")
        settled = None
        if parent_saga is not None and parent_pending == 0:
            settled = await self.settle_parent(parent_saga)
            if settled is None:
                self.ready_sagas.add(parent_saga)
        timed = None if terminal else (ready_at if ready_at is not None else deadline)
        wake_in = None
        if timed is not None and timed > view.now:
            wake_in = (timed - view.now).total_seconds()
        return AfterCommit(
            ready_sagas=self.ready_sagas
            if wake_in is None
            else self.ready_sagas - {self.saga.name},
            root_done=self.run.root_id if root_done else self.run.id if alone else None,
            events=self.events.rows,
            wake_in=wake_in,
            touched=self.touched,
            ready=self.run.ready,
            again=not terminal and ready_at is not None and wake_in is None,
            lineage=self.run.lineage,
            settled=settled,
        )

    async def settle_parent(self, saga: str) -> AfterCommit | None:
        """Finish the parent this transaction just made ready, if that is bookkeeping only.

        The usual end of a saga — every step done, the last step's children now finished —
        needs no user code: its COMMITTED is written here, in the child's transaction,
        instead of in a transaction of its own (and so on up the tree). Anything else (a
        next step, failed children, a deadline) is left to a worker as usual.
        """
        binding = self.settings.bindings.get(saga)
        if binding is None or self.settling >= SETTLE_DEPTH or self.run.parent_id is None:
            return None
        # This transaction updated the parent row: the lock is ours already. A paused
        # saga's runs wait for `resume`, bookkeeping included.
        parent = await self.store.reclaim(self.conn, self.run.parent_id, unless_paused=True)
        if parent is None or parent.pending or parent.failed or parent.rollback_request:
            return None
        if parent.prefix is not None and parent.prefix not in binding.definition.accepted:
            return None  # its position is not in this worker's definition of the saga
        sub = StepTransaction(self.settings, self.conn, binding, parent, settling=self.settling + 1)
        decision = sub.machine.resume(sub.state, sub.wake(sub.state)).action
        if not (isinstance(decision, Finish) and decision.status == COMMITTED):
            return None
        return await sub.advance()
