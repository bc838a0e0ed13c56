"""The worker: one anyio task group per process that runs the steps of the sagas it serves.

Three kinds of tasks share it:
- a LISTEN connection: a notification wakes a saga the moment one of its runs is ready;
- a poll loop: the safety net (lost notifications, poll-only mode) and the timer that
  sleeps until the earliest `ready_at` (durable sleep, deadlines, retries);
- per saga, a claimer that, when woken, claims ready runs and hands each (its transaction
  open, its row locked) to an executor task; at most `instances` executors run at once,
  and an executor keeps claiming on its own connection while more runs are ready.
Correctness never depends on notifications: the poll alone finds every ready run.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio
import anyio.abc
import asyncpg
import structlog

from .database import Database
from .faults import connection_lost, gone
from .limits import Limited
from .liveness import Liveness
from .records import AfterCommit, Binding, Lease
from .runner import Runner
from .store import Store

log = structlog.get_logger("scoopy")

if TYPE_CHECKING:
    Pooled: TypeAlias = asyncpg.pool.PoolConnectionProxy[asyncpg.Record]


@dataclass
class ServedSaga:
    """A saga this worker serves: its claimer's wake-up and how many executors run its steps."""

    binding: Binding
    wake: anyio.Event = field(default_factory=anyio.Event)
    active: int = 0
    loop_started: bool = False
    full: bool = False  # a wake-up came while every slot was busy: claim when one frees
    limited: bool = False  # a claim met the saga's limit: claim again when a step ends
    at_limit: bool = False  # said so in the log (once per episode)


class Worker:
    """Runs the steps of the sagas in `bindings` until stopped."""

    def __init__(
        self,
        database: Database,
        store: Store,
        runner: Runner,
        liveness: Liveness,
        *,
        listen: bool,
        poll_interval: float,
        on_root_done: Callable[[uuid.UUID | None], None],
    ) -> None:
        self.database = database
        self.pool = database.pool
        self.store = store
        self.runner = runner
        self.liveness = liveness
        self.listen = listen
        self.poll_interval = poll_interval
        self.on_root_done = on_root_done
        self.served: dict[str, ServedSaga] = {}
        self.stopping = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._poke = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self._busy = 0
        self._timer: float | None = None  # monotonic time of the earliest known due run
        self._poll_now = True

    # -- lifecycle -------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if self.listen:
                await tg.start(self._listen_loop)
            tg.start_soon(self._poll_loop)
            tg.start_soon(self.liveness.run)
            for served in self.served.values():
                self._start_saga(served)
            task_status.started()

    async def stop(self, grace: float) -> None:
        """Stop claiming, let running steps finish (up to `grace` seconds), then cancel."""
        self.stopping = True
        for served in self.served.values():
            served.wake.set()
        with anyio.move_on_after(grace):
            await self._idle.wait()
        await self.liveness.stop()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    def serve(self, binding: Binding) -> None:
        """Start (or update) serving a saga."""
        existing = self.served.get(binding.saga.name)
        if existing is not None:
            existing.binding = binding
            return
        served = ServedSaga(binding)
        self.served[binding.saga.name] = served
        if self._tg is not None:
            self._start_saga(served)
        self._poll_now = True
        self._poke.set()

    def _start_saga(self, served: ServedSaga) -> None:
        assert self._tg is not None
        if not served.loop_started:
            served.loop_started = True
            self._tg.start_soon(self._saga_loop, served)
            served.wake.set()

    # -- waking ----------------------------------------------------------------------------

    def wake(self, saga: str) -> None:
        served = self.served.get(saga)
        if served is not None:
            served.wake.set()

    def wake_in(self, seconds: float) -> None:
        """Make sure the poll loop looks again in `seconds` (a run of ours is due then)."""
        due = time.monotonic() + seconds
        if self._timer is None or due < self._timer:
            self._timer = due
            self._poke.set()

    def wake_all(self) -> None:
        for served in self.served.values():
            served.wake.set()

    def _on_notify(self, _conn: Any, pid: int, _channel: str, payload: object) -> None:
        # Only flag work here: the database is never touched from a notification callback.
        if not isinstance(payload, str) or pid in self.database.own:
            return  # sent by this process, which woke itself when it committed
        if payload.startswith("r:"):
            self.wake(payload[2:])
        elif payload.startswith("d:"):
            try:
                self.on_root_done(uuid.UUID(payload[2:]))
            except ValueError:
                log.warning("ignoring malformed notification", payload=payload)

    # -- tasks -----------------------------------------------------------------------------

    async def _listen_loop(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep one LISTEN connection open, reconnecting with backoff whenever it is lost.

        Notifications sent while it was away are lost: after each reconnect every saga
        looks for work and every waiter asks again.
        """
        delay = 0.1
        started = False
        outage = self.database.outage
        while not self.stopping:
            lost = anyio.Event()
            conn: asyncpg.Connection[asyncpg.Record] | None = None
            try:
                conn = await self.database.connect_listener()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(self.store.channel, self._on_notify)
                delay = 0.1
                outage.back()
                if started:
                    self.wake_all()
                    self.on_root_done(None)
                else:
                    started = True
                    task_status.started()
                await lost.wait()
                outage.lost("listen", ConnectionResetError("the LISTEN connection closed"))
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:
                outage.lost("listen", exc)
                if not started:
                    started = True
                    task_status.started()
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                if conn is not None:
                    with anyio.CancelScope(shield=True):
                        await _close_quietly(conn)

    async def _poll_loop(self) -> None:
        """Poll every `poll_interval`, and also when the earliest known due time comes.

        A timer never postpones a poll: the poll is the safety net for whatever no
        notification announced.
        """
        next_poll = time.monotonic()
        while not self.stopping:
            now = time.monotonic()
            wake = next_poll if self._timer is None else min(next_poll, self._timer)
            if wake > now and not self._poll_now:
                with anyio.move_on_after(wake - now):
                    await self._poke.wait()
                self._poke = anyio.Event()
                now = time.monotonic()
                timer_due = self._timer is not None and self._timer <= now
                if now < next_poll and not timer_due and not self._poll_now:
                    continue  # only the timer moved: sleep again until the earliest time
            self._poll_now = False
            self._timer = None
            next_poll = now + self.poll_interval
            sagas = list(self.served)
            if not sagas:
                continue
            try:
                async with self.pool.acquire() as conn:
                    due, db_now = await self.store.poll(conn, sagas)
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:
                self._trouble("poll", exc)
                continue
            self.database.outage.back()
            assert db_now is not None
            for saga, ready_at in due:
                if ready_at is None:
                    continue
                if ready_at <= db_now:
                    self.wake(saga)
                else:
                    # Wake just after the earliest due time; never busy-wait.
                    self.wake_in((ready_at - db_now).total_seconds() + 0.001)

    async def _saga_loop(self, served: ServedSaga) -> None:
        """The saga's claimer: on each wake-up, claim ready runs while there is capacity.

        Each claimed run (its transaction open, its row locked) goes to an executor task.
        Claiming in one place means one empty claim per burst of wake-ups at most, where
        executors claiming side by side raced each other for the same runs.
        """
        assert self._tg is not None
        failures = 0
        while not self.stopping:
            await served.wake.wait()
            served.wake = anyio.Event()
            while not self.stopping:
                if served.active >= served.binding.saga.instances:
                    served.full = True
                    break
                try:
                    claimed = await self._claim(served)
                    failures = 0
                except anyio.get_cancelled_exc_class():
                    raise
                except Exception as exc:
                    failures += 1
                    delay = min(5.0, 0.05 * math.pow(2, failures))
                    self._trouble("claim", exc, saga=served.binding.saga.name, delay=delay)
                    await anyio.sleep(delay)
                    served.wake.set()
                    break
                if claimed is None:
                    break
                if isinstance(claimed, Limited):
                    self._limited(served, claimed)
                    break
                conn, lease = claimed
                served.at_limit = False
                self._enter(served)
                self._tg.start_soon(self._execute, served, conn, lease)
                if lease.claimed.ready <= served.active:
                    break  # every ready run is being taken care of: spare an empty claim

    async def _claim(self, served: ServedSaga) -> tuple[Pooled, Lease] | Limited | None:
        conn = await self.pool.acquire()
        try:
            lease = await self.runner.claim(conn, served.binding)
        except BaseException:
            await self._release(conn, dirty=False)
            raise
        if not isinstance(lease, Lease):
            await self._release(conn, dirty=False)
            return lease
        return conn, lease

    def _limited(self, served: ServedSaga, limited: Limited) -> None:
        """The saga is at a limit: look again when it may have eased (or a step here ends)."""
        served.limited = True
        self.wake_in(limited.wait)
        if not served.at_limit:
            served.at_limit = True
            log.info(
                "saga at its limit; runs wait", saga=served.binding.saga.name, limit=limited.reason
            )

    async def _execute(self, served: ServedSaga, conn: Pooled, lease: Lease | None) -> None:
        """Advance a claimed run, then keep claiming on this connection while work remains.

        Claims made here run in parallel across executors; the claimer only starts them.
        """
        advanced = None

        # A rate's start is taken before the claim's transaction begins: no handover.
        handover = served.binding.saga.rate is None

        def more(done: AfterCommit) -> bool:
            return handover and not self.stopping and (done.again or done.ready > served.active)

        try:
            while lease is not None:
                advanced = await self.runner.advance(conn, served.binding, lease, more)
                next_tx, advanced.next_tx = advanced.next_tx, None
                if not more(advanced):
                    if next_tx is not None:
                        await next_tx.rollback()  # stopping began during the commit
                    break
                if advanced.touched:  # not handed over: the pool resets the session
                    await self._release(conn, dirty=True)
                    conn = await self.pool.acquire()
                    advanced = None
                claimed = await self.runner.claim(conn, served.binding, next_tx)
                if isinstance(claimed, Limited):
                    self._limited(served, claimed)
                    break
                lease = claimed
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            advanced = None
            # The run stays ready (or was deferred, if it cannot be advanced); back off
            # while holding the capacity, so a broken database is not hammered.
            self._trouble("step", exc, saga=served.binding.saga.name)
            await anyio.sleep(0.5)
            served.wake.set()
        finally:
            await self._release(conn, dirty=advanced is None or advanced.touched)
            self._leave(served)

    async def _release(self, conn: Pooled, *, dirty: bool) -> None:
        """Return a connection; only one user code used gets the pool's session reset.

        A connection that died is back in the pool already (asyncpg replaces it); one whose
        reset fails is closed by the pool. Neither is this task's problem.
        """
        if dirty and not gone(conn):
            self.database.dirty.add(conn.get_server_pid())
        with anyio.CancelScope(shield=True):
            try:
                await self.pool.release(conn)
            except Exception as exc:
                self._trouble("release", exc)

    def _trouble(self, where: str, exc: BaseException, **fields: Any) -> None:
        """Report a failure of one of the worker's tasks, which then retries."""
        if connection_lost(exc):
            self.database.outage.lost(where, exc)
        else:
            log.warning(f"{where} failed; retrying", error=repr(exc), **fields)

    def _enter(self, served: ServedSaga) -> None:
        served.active += 1
        self._busy += 1
        if self._idle.is_set():
            self._idle = anyio.Event()

    def _leave(self, served: ServedSaga) -> None:
        if served.full or served.limited:
            served.full = served.limited = False
            served.wake.set()
        served.active -= 1
        self._busy -= 1
        if self._busy == 0:
            self._idle.set()


async def _close_quietly(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    if conn.is_closed():
        return
    try:
        await conn.close(timeout=2)
    except Exception:
        conn.terminate()
