"""Claim a ready run, advance it in its transaction, commit: one step, start to finish."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import anyio
import asyncpg
import structlog
from asyncpg.transaction import Transaction

from ..context import CooperationContext
from ..vocab import Connection
from . import handover
from .definition import Untranslatable
from .faults import DB_TRANSIENT, TRANSIENT, CancelledMeanwhile, Redo, connection_lost, gone
from .instrument import log_events
from .limits import FAIR_EVERY, Limited, Limits
from .liveness import hold
from .records import AfterCommit, Binding, Claimed, Lease, OnCommitted
from .step import StepSettings, StepTransaction

log = structlog.get_logger("scoopy")


class Runner:
    """Runs steps for the sagas of one `Cooperation`."""

    def __init__(self, settings: StepSettings, on_committed: OnCommitted) -> None:
        self.settings = settings
        self.store = settings.store
        self.worker = settings.worker
        self.on_committed = on_committed
        self.limits = Limits(settings.store)
        self._strikes: dict[uuid.UUID, int] = {}
        self._planned: set[int] = set()  # backends whose claim plan was built (plan_claim)
        # Bound once: binding per step was a measurable cost. (Configure structlog before
        # starting the Cooperation, as the CLI does.)
        self.log = log.bind()
        self.log_enabled = getattr(self.log, "is_enabled_for", None)

    async def claim(
        self, conn: Connection, binding: Binding, tx: Transaction | None = None
    ) -> Lease | Limited | None:
        """Lock one ready run of the saga in `tx`, or in a transaction opened on `conn`.

        On success the transaction stays open for `advance`; otherwise it is closed. A
        saga's limits (`engine/limits.py`) may say to claim nothing now (`Limited`).
        (asyncpg's Transaction object, not a bare BEGIN, so that user code can nest
        `async with scope.connection.transaction()` blocks.)
        """
        saga = binding.saga
        token = False
        if saga.rate is not None:
            if tx is not None:  # a rate's start is taken before the transaction begins
                await tx.rollback()
                tx = None
            limited = await self.limits.take_token(conn, binding)
            if limited is not None:
                return limited
            token = True
        if tx is None:
            tx = conn.transaction()
            await tx.start()
        try:
            if saga.concurrency is not None:
                limited = await self.limits.take_slot(conn, binding, binding.slot_misses)
                if limited is not None:
                    binding.slot_misses += 1
                    await tx.rollback()
                    if token:
                        await self.limits.refund_token(conn, binding)
                    return limited
                binding.slot_misses = 0
            backend = conn.get_server_pid()
            if backend not in self._planned:
                await self.store.plan_claim(conn)
                self._planned.add(backend)
            claimed = await self._pick(conn, binding)
        except BaseException:
            await _rollback(tx, conn)
            raise
        if claimed is None:
            await tx.rollback()
            if token:
                await self.limits.refund_token(conn, binding)
            return None
        return Lease(claimed, tx)

    async def _pick(self, conn: Connection, binding: Binding) -> Claimed | None:
        saga = binding.saga
        # Counting past `instances` would not change what the worker does next.
        args = (saga.name, saga.instances + 1, binding.accepted, binding.starts_new)
        if not saga.priorities:
            return await self.store.claim(conn, *args)
        claimed = None
        if (binding.claims + 1) % FAIR_EVERY:  # every FAIR_EVERYth takes the oldest: none starves
            claimed = await self.store.claim(conn, *args, by_priority=True)
        if claimed is None:
            claimed = await self.store.claim(conn, *args)
        if claimed is not None:
            binding.claims += 1
        return claimed

    async def advance(
        self,
        conn: Connection,
        binding: Binding,
        lease: Lease,
        then_claim: Callable[[AfterCommit], bool] | None = None,
    ) -> AfterCommit:
        """Advance a run claimed by `claim` and commit (or roll back) its transaction.

        When `then_claim` says so, the commit also begins the transaction of the next
        claim (`AfterCommit.next_tx`), in the same round trip, resetting the session first if
        user code used the connection.
        """
        claimed = lease.claimed
        try:
            try:
                try:
                    step = StepTransaction(self.settings, conn, binding, claimed)
                    advanced = await step.advance()
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
                    raise Redo(exc) from exc
            except (Redo, CancelledMeanwhile) as again:
                # Replayed with the failure in place of the code, or (cancelled while the
                # step ran) advanced afresh, when the run gives up at the step's boundary.
                injected = (again.error, again.context) if isinstance(again, Redo) else None
                redone = await self._redo(conn, binding, claimed, injected)
                advanced = AfterCommit() if redone is None else redone
                advanced.touched = True  # the discarded attempt may have used the connection
        except Untranslatable as exc:
            # Released by an operator into a definition it does not fit (a step it reached
            # is gone): held again, with the reason.
            reason = f"saga {binding.saga.name!r}: run {claimed.id} cannot go on here: {exc}"
            async with conn.transaction():
                await hold(self.settings.topology, conn, [claimed.id], [reason], self.worker)
            log.warning("run held", saga=binding.saga.name, run_id=str(claimed.id), reason=reason)
            return AfterCommit()
        except TRANSIENT:
            raise
        except Exception as exc:
            if connection_lost(exc, conn):
                # Transient like any lost connection: the step runs again once it is back.
                raise ConnectionResetError(f"lost the connection in a step: {exc!r}") from exc
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
                log_events(self.log, self.log_enabled, done.events, self.worker, done.lineage)
        return advanced

    async def _redo(
        self,
        conn: Connection,
        binding: Binding,
        claimed: Claimed,
        injected: tuple[BaseException, CooperationContext | None] | None,
    ) -> AfterCommit | None:
        """Redo a transaction that was rolled back, without its user code.

        The rollback undid everything; the run is locked again (waiting if need be) and,
        unless someone advanced it meanwhile, replayed with the recorded failure (`injected`)
        in place of the user code, or, without one, advanced afresh. None if someone else
        had advanced it.
        """
        async with conn.transaction():
            again = await self.store.reclaim(conn, claimed.id)
            if again is None or (again.status, again.state, again.rollback_request) != (
                claimed.status,
                claimed.state,
                claimed.rollback_request,
            ):
                return None
            redo = StepTransaction(self.settings, conn, binding, again, injected=injected)
            return await redo.advance()


async def _rollback(tx: Transaction, conn: Connection) -> None:
    """Roll back, shielded from cancellation: the run must not stay locked.

    On a connection that died there is nothing to roll back: the server aborted the
    transaction and released the lock when the connection went.
    """
    if gone(conn):
        return
    with anyio.CancelScope(shield=True):
        try:
            await tx.rollback()
        except Exception as exc:
            if not connection_lost(exc, conn):
                raise
