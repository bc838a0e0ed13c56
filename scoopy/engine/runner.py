"""Advance one claimed run inside one transaction: the machine decides, the runner does."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import anyio
import asyncpg
import msgspec
import structlog
from asyncpg.transaction import Transaction

from ..context import CooperationContext
from ..failure import (
    NO_MESSAGE,
    CooperationFailure,
    GaveUp,
    ParentSaidSo,
    failure_from_exception,
)
from ..message import Message, Topic
from ..saga import Saga
from ..scope import Scope, _current
from ..strategy import DEFAULT_STRATEGY, EventLoopStrategy, RunView
from . import handover
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
    Phase,
    RollbackChildren,
    RunState,
    SkipUnstarted,
    Transition,
    Wait,
    Wake,
)
from .store import Claimed, Connection, EventRow, RunWrite, Store

log = structlog.get_logger("scoopy")

# Database errors that say nothing about the step's business logic: the connection or the
# server failed, or the transaction lost a race (serialization, deadlock). The transaction
# is abandoned and the step retried; the saga is never rolled back for them.
DB_TRANSIENT: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
)
# Around scoopy's own statements, a lost socket or a timeout is transient too. (Raised by
# user code, the same exceptions are business failures: an HTTP client's ConnectionError
# is the step's failure, not the database's.)


class KeyRaced(Exception):
    """A keyed launch of the step lost to a launch of the same key that committed while
    the step ran: the id the step was given does not exist. The transaction is abandoned
    and the step run again, when the launch finds the winner's message."""


TRANSIENT: tuple[type[BaseException], ...] = (
    *DB_TRANSIENT,
    ConnectionError,
    TimeoutError,
    KeyRaced,
)

_state_decoder = msgspec.json.Decoder(RunState)
_state_encoder = msgspec.json.Encoder()


class RollbackRequest(msgspec.Struct, frozen=True):
    """What a parent or an operator writes on a run to make it roll back."""

    origin: Literal["parent", "external"]
    cause: CooperationFailure


_request_decoder = msgspec.json.Decoder(RollbackRequest)


@dataclass
class Binding:
    """A saga served by this process, with the topics it listens on and its strategy."""

    saga: Saga
    topics: dict[str, Topic[Any]] = field(default_factory=dict)

    @property
    def strategy(self) -> EventLoopStrategy:
        return self.saga.strategy or DEFAULT_STRATEGY

    def topic(self, name: str) -> Topic[Any]:
        return self.topics.get(name) or Topic(name)


@dataclass
class Advanced:
    """What one transaction did, for the worker to act on after commit."""

    ready_sagas: set[str] = field(default_factory=set)
    root_done: uuid.UUID | None = None
    events: list[EventRow] = field(default_factory=list)
    wake_in: float | None = None  # seconds until the run is due again, if it waits for a time
    touched: bool = False  # user code used the connection (it may have changed session state)
    ready: int = 0  # runs of the saga ready when this one was claimed (held ones included)
    again: bool = False  # this run is ready for its next step right away
    lineage: list[uuid.UUID] = field(default_factory=list)
    settled: Advanced | None = None  # the parent this transaction also finished (see settle)
    next_tx: Transaction | None = None  # begun with the commit, for the next claim

    def chain(self) -> list[Advanced]:
        """This run's result and those of the ancestors settled in the same transaction."""
        found: list[Advanced] = []
        node: Advanced | None = self
        while node is not None:
            found.append(node)
            node = node.settled
        return found


# How many ancestors one transaction may finish on top of its own run.
SETTLE_DEPTH = 16


def _raw_failure(failure: CooperationFailure | None) -> msgspec.Raw | None:
    return None if failure is None else msgspec.Raw(failure.to_json())


def _raw(data: bytes | None) -> msgspec.Raw | None:
    return None if data is None else msgspec.Raw(data)


def _json(failure: CooperationFailure | None) -> str | None:
    return None if failure is None else failure.to_json().decode()


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode()


class Runner:
    """Runs steps for the sagas of one `Cooperation`."""

    def __init__(
        self,
        store: Store,
        worker: str,
        *,
        listen: bool,
        max_depth: int,
        on_committed: Callable[[Advanced], None],
        max_recursion: int = 16,
        bindings: dict[str, Binding] | None = None,
    ) -> None:
        self.store = store
        self.worker = worker
        self.listen = listen
        self.max_depth = max_depth
        self.max_recursion = max_recursion
        self.bindings = bindings if bindings is not None else {}
        self.on_committed = on_committed
        self._strikes: dict[uuid.UUID, int] = {}
        self._planned: set[int] = set()  # backends whose claim plan was built (plan_claim)
        # Bound once: binding per step was a measurable cost. (Configure structlog before
        # starting the Cooperation, as the CLI does.)
        self.log = log.bind()
        self.log_enabled = getattr(self.log, "is_enabled_for", None)

    async def claim(
        self, conn: Connection, binding: Binding, tx: Transaction | None = None
    ) -> Lease | None:
        """Lock one ready run of the saga in `tx`, or in a transaction opened on `conn`.

        On success the transaction stays open for `advance`; otherwise it is closed.
        (asyncpg's Transaction object, not a bare BEGIN, so that user code can nest
        `async with scope.connection.transaction()` blocks.)
        """
        if tx is None:
            tx = conn.transaction()
            await tx.start()
        try:
            backend = conn.get_server_pid()
            if backend not in self._planned:
                await self.store.plan_claim(conn)
                self._planned.add(backend)
            # Counting past `instances` would not change what the worker does next.
            claimed = await self.store.claim(conn, binding.saga.name, binding.saga.instances + 1)
        except BaseException:
            await _rollback(tx, conn)
            raise
        if claimed is None:
            await tx.rollback()
            return None
        return Lease(claimed, tx)

    async def advance(
        self,
        conn: Connection,
        binding: Binding,
        lease: Lease,
        then_claim: Callable[[Advanced], bool] | None = None,
    ) -> Advanced:
        """Advance a run claimed by `claim` and commit (or roll back) its transaction.

        When `then_claim` says so, the commit also begins the transaction of the next
        claim (`Advanced.next_tx`), in the same round trip, resetting the session first if
        user code used the connection.
        """
        claimed = lease.claimed
        try:
            try:
                try:
                    advanced = await _Advance(self, conn, binding, claimed).advance()
                except BaseException:
                    await _rollback(lease.tx, conn)
                    raise
                try:
                    if handover.SUPPORTED and then_claim is not None and then_claim(advanced):
                        advanced.next_tx = await handover.commit_and_begin(
                            conn, lease.tx, reset=advanced.touched
                        )
                        advanced.touched = False  # its session state was reset with the commit
                    else:
                        await lease.tx.commit()
                except asyncpg.PostgresError as exc:
                    # A deferred constraint the step's own writes broke: the step failed.
                    if isinstance(exc, DB_TRANSIENT) or not advanced.touched:
                        raise
                    raise _Redo(exc) from exc
            except _Redo as redo:
                redone = await self._redo(conn, binding, claimed, redo.error, redo.context)
                advanced = Advanced() if redone is None else redone
                advanced.touched = True  # the failed attempt used the connection
        except TRANSIENT:
            raise
        except Exception as exc:
            if not conn.is_closed():
                # A run we cannot advance must not starve the runs queued behind it.
                strikes = self._strikes.get(claimed.id, 0) + 1
                self._strikes[claimed.id] = strikes
                delay = min(300.0, 0.5 * 2**strikes)
                await self.store.defer(conn, claimed.id, delay)
                log.error(
                    "could not advance run; deferred",
                    saga=binding.saga.name,
                    run_id=str(claimed.id),
                    error=repr(exc),
                    retry_in=delay,
                )
            raise
        self._strikes.pop(claimed.id, None)
        for done in advanced.chain():
            self.on_committed(done)
            if done.events:
                _log_events(self.log, self.log_enabled, done.events, self.worker, done.lineage)
        return advanced

    async def run_next(self, conn: Connection, binding: Binding) -> Advanced | None:
        """Claim one ready run of the saga and advance it; None if none was ready."""
        lease = await self.claim(conn, binding)
        return None if lease is None else await self.advance(conn, binding, lease)

    async def _redo(
        self,
        conn: Connection,
        binding: Binding,
        claimed: Claimed,
        error: BaseException,
        context: CooperationContext | None,
    ) -> Advanced | None:
        """Redo a transaction whose user code failed after writing, without that code.

        The rollback undid everything; the run is locked again (waiting if need be) and,
        unless someone advanced it meanwhile, replayed with the recorded failure in place
        of the user code. None if someone else had advanced it.
        """
        async with conn.transaction():
            again = await self.store.reclaim(conn, claimed.id)
            if again is None or (again.status, again.state, again.rollback_request) != (
                claimed.status,
                claimed.state,
                claimed.rollback_request,
            ):
                return None
            redo = _Advance(self, conn, binding, again, injected=(error, context))
            return await redo.advance()


async def _rollback(tx: Transaction, conn: Connection) -> None:
    """Roll back, shielded from cancellation: the run must not stay locked."""
    if conn.is_closed():
        return
    with anyio.CancelScope(shield=True):
        await tx.rollback()


@dataclass(frozen=True, slots=True)
class Lease:
    """A claimed run and the open transaction holding its lock."""

    claimed: Claimed
    tx: Transaction


class _Redo(Exception):
    """User code failed after writing through the step's connection: the whole transaction
    must be rolled back and the run advanced again with this failure."""

    def __init__(self, error: BaseException, context: CooperationContext | None = None) -> None:
        super().__init__(repr(error))
        self.error = error
        self.context = context


class _Advance:
    """One transaction's worth of progress for one run."""

    def __init__(
        self,
        runner: Runner,
        conn: Connection,
        binding: Binding,
        claimed: Claimed,
        injected: tuple[BaseException, CooperationContext | None] | None = None,
        settling: int = 0,
    ):
        self.runner = runner
        self.store = runner.store
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
        self.events: list[EventRow] = []
        self.notify: list[str] = []
        self.ready_sagas: set[str] = set()
        self.message: Message[Any] | None = None
        self.pending = claimed.pending
        self.reset_failed = False
        self.result: str | None = None
        self.touched = False
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
        self.events.append(
            EventRow(
                root_id=self.run.root_id,
                type=spec.type,
                message_id=self.run.message_id,
                run_id=self.run.id,
                saga=self.saga.name,
                step=spec.step,
                phase=spec.phase,
                step_index=spec.step_index,
                instance=spec.instance,
                iteration=spec.iteration,
                handler_iteration=spec.handler_iteration,
                failure=_raw_failure(spec.failure),
                context=_raw(self.context.encode()),
            )
        )

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

    async def advance(self) -> Advanced:
        state = self.state
        if self.run.status == "pending":
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
                        Instance(r.instance, r.step_index, r.iteration, r.handler_iteration)
                        for r in done
                    )
                    + self.buffered_instances()
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

    def buffered_instances(self) -> tuple[Instance, ...]:
        """Instances committed by this very transaction (its events are written at the end)."""
        return tuple(
            Instance(e.instance, e.step_index, e.iteration, e.handler_iteration)
            for e in self.events
            if e.type == EventType.SUSPENDED
            and e.run_id == self.run.id
            and e.phase in (Phase.STEP, Phase.HANDLER)
            and e.instance is not None
            and e.step_index is not None
            and e.iteration is not None
        )

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
            max_depth=self.runner.max_depth,
            max_recursion=self.runner.max_recursion,
            services=self,
        )

    async def user_code(
        self, scope: Scope, call: Callable[[], Any], path: Literal["happy", "rollback"]
    ) -> tuple[Any, BaseException | None]:
        """Run user code; on failure return the error with none of its writes left.

        No savepoint is paid for: code that failed before touching `scope.connection` wrote
        nothing, and code that failed after touching it makes the whole transaction redo
        (`_Redo`). A run that ran out of time during the code gives up inside the same
        transaction, so the overrunning work is discarded rather than committed.
        """
        if self.injected is not None:
            (error, context), self.injected = self.injected, None
            if context is not None:
                self.context = context  # what the failed code set, as if it had not written
            return None, error
        token = _current.set(scope)
        try:
            result = await call()
            state = msgspec.structs.replace(self.state, path=path)
            reason = self.strategy.give_up(self.view(state))
            if reason is not None:
                raise GaveUp(self.machine.gave_up(reason))
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            if isinstance(exc, DB_TRANSIENT) or self.conn.is_closed():
                raise
            if scope.touched:
                raise _Redo(exc, self.context.copy()) from exc
            return None, exc
        finally:
            _current.reset(token)
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
            raise _Redo(exc) from exc
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
            self.events.append(
                EventRow(
                    root_id=launch.root_id,
                    type=EventType.EMITTED,
                    message_id=launch.id,
                    run_id=self.run.id if launch.scoped else None,
                    saga=self.saga.name if launch.scoped else None,
                    step=scope.step if launch.scoped else None,
                    instance=launch.instance,
                    context=None
                    if launch.context is None
                    else msgspec.Raw(launch.context.encode()),
                )
            )

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

        following, error = await self.user_code(scope, call, "happy")
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

        following, raised = await self.user_code(scope, call, "happy")
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

        _, error = await self.user_code(scope, call, "rollback")
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
        context = _text(self.context.encode())
        # Each child keeps its own context with the parent's on top; deadlines combine, so
        # a stricter one the child set survives a looser one of the parent.
        contexts = {
            child: _text(CooperationContext.decode(own).merged(self.context).encode())
            for child, own in await self.store.committed_children(
                self.conn, self.run.id, act.instance.seq
            )
        }
        messages, sagas = await self.store.rollback_children(
            self.conn, self.run.id, act.instance.seq, act.seq, request, contexts
        )
        step_name = self.machine.rollback_name(act.instance.step, children=True)
        for message_id in messages:
            self.events.append(
                EventRow(
                    root_id=self.run.root_id,
                    type=EventType.ROLLBACK_EMITTED,
                    message_id=message_id,
                    run_id=self.run.id,
                    saga=self.saga.name,
                    step=step_name,
                    instance=act.seq,
                    failure=_raw_failure(said_so),
                    context=None if context is None else msgspec.Raw(context.encode()),
                )
            )
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
    ) -> Advanced:
        terminal = final is not None
        view = self.view(state)
        status = final.status if final is not None else "active"
        parent_failed = int(
            final is not None
            and final.status != "committed"
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
            context=_text(self.context.encode()),
            failure=_json(final.failure) if final is not None else None,
            rollback_failure=_json(final.rollback_failure) if final is not None else None,
            result=self.result,
            terminal=terminal,
            parent_id=self.run.parent_id,
            parent_failed=parent_failed,
            notify_parent=notify_parent,
            events=self.events,
            notify=self.notify,
            sleeping=not terminal and state.path == "happy" and self.pending == 0,
        )
        try:
            parent_saga, parent_pending = await self.store.finish(
                self.conn, write, self.runner.worker, self.runner.listen
            )
        except asyncpg.exceptions.InFailedSQLTransactionError as exc:
            if not self.touched:
                raise
            raise _Redo(exc) from exc  # user code swallowed an SQL error
        settled = None
        if parent_saga is not None and parent_pending == 0:
            settled = await self.settle_parent(parent_saga)
            if settled is None:
                self.ready_sagas.add(parent_saga)
        timed = None if terminal else (ready_at if ready_at is not None else deadline)
        wake_in = None
        if timed is not None and timed > view.now:
            wake_in = (timed - view.now).total_seconds()
        return Advanced(
            ready_sagas=self.ready_sagas
            if wake_in is None
            else self.ready_sagas - {self.saga.name},
            root_done=self.run.root_id if root_done else self.run.id if alone else None,
            events=self.events,
            wake_in=wake_in,
            touched=self.touched,
            ready=self.run.ready,
            again=not terminal and ready_at is not None and wake_in is None,
            lineage=self.run.lineage,
            settled=settled,
        )

    async def settle_parent(self, saga: str) -> Advanced | None:
        """Finish the parent this transaction just made ready, if that is bookkeeping only.

        The usual end of a saga — every step done, the last step's children now finished —
        needs no user code: its COMMITTED is written here, in the child's transaction,
        instead of in a transaction of its own (and so on up the tree). Anything else (a
        next step, failed children, a deadline) is left to a worker as usual.
        """
        binding = self.runner.bindings.get(saga)
        if binding is None or self.settling >= SETTLE_DEPTH or self.run.parent_id is None:
            return None
        # This transaction updated the parent row: the lock is ours already. A paused
        # saga's runs wait for `resume`, bookkeeping included.
        parent = await self.store.reclaim(self.conn, self.run.parent_id, unless_paused=True)
        if parent is None or parent.pending or parent.failed or parent.rollback_request:
            return None
        sub = _Advance(self.runner, self.conn, binding, parent, settling=self.settling + 1)
        decision = sub.machine.resume(sub.state, sub.wake(sub.state)).action
        if not (isinstance(decision, Finish) and decision.status == "committed"):
            return None
        return await sub.advance()


_LOUD = {EventType.ROLLING_BACK, EventType.ROLLBACK_FAILED, EventType.ATTEMPT_FAILED}
_INFO = {EventType.COMMITTED, EventType.ROLLED_BACK, EventType.CANCELLATION_REQUESTED}


def _log_events(
    logger: Any,
    enabled: Callable[[int], bool] | None,
    events: list[EventRow],
    worker: str,
    lineage: list[uuid.UUID],
) -> None:
    for event in events:
        level = (
            logging.WARNING
            if event.type in _LOUD
            else logging.INFO
            if event.type in _INFO
            else logging.DEBUG
        )
        if enabled is not None and not enabled(level):
            continue  # nobody reads it: skip building the fields
        fields = {
            "saga": event.saga,
            "step": event.step,
            "run_id": str(event.run_id) if event.run_id else None,
            "root_id": str(event.root_id),
            "message_id": str(event.message_id) if event.message_id else None,
            "lineage": [str(item) for item in (lineage if event.run_id else [event.root_id])],
            "worker": worker,
        }
        if event.type in _LOUD:
            failure = None if event.failure is None else bytes(event.failure).decode()
            logger.warning(event.type, failure=failure, **fields)
        elif event.type in _INFO:
            logger.info(event.type, **fields)
        else:
            logger.debug(event.type, **fields)
