"""The worker: one anyio task group per process that runs the steps of the sagas it serves.

Three kinds of tasks share it:
- a LISTEN connection: a notification wakes a saga the moment one of its runs is ready;
- a poll loop: the safety net (lost notifications, poll-only mode) and the timer that
  sleeps until the earliest `ready_at` (durable sleep, deadlines, retries);
- per saga, up to `instances` step slots, each claiming and running one run at a time.
Correctness never depends on notifications: the poll alone finds every ready run.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import anyio
import anyio.abc
import asyncpg
import structlog

from .runner import TRANSIENT, Binding, Runner
from .store import Store

log = structlog.get_logger("scoopy")

RETRYABLE: tuple[type[BaseException], ...] = (OSError, asyncpg.PostgresError, *TRANSIENT)

if TYPE_CHECKING:
    ListenerFactory: TypeAlias = Callable[[], Awaitable[asyncpg.Connection[asyncpg.Record]]]


@dataclass
class _Slots:
    binding: Binding
    wake: anyio.Event = field(default_factory=anyio.Event)
    active: int = 0
    loop_started: bool = False


class Worker:
    """Runs the steps of the sagas in `bindings` until stopped."""

    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        store: Store,
        runner: Runner,
        *,
        listen: bool,
        poll_interval: float,
        connect_listener: ListenerFactory,
        on_root_done: Callable[[uuid.UUID | None], None],
    ) -> None:
        self.pool = pool
        self.store = store
        self.runner = runner
        self.listen = listen
        self.poll_interval = poll_interval
        self.connect_listener = connect_listener
        self.on_root_done = on_root_done
        self.slots: dict[str, _Slots] = {}
        self.stopping = False
        self._tg: anyio.abc.TaskGroup | None = None
        self._poke = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self._busy = 0
        self._timer: float | None = None  # monotonic time of the earliest known due run
        self._poll_now = True
        self.listening = anyio.Event()

    # -- lifecycle -------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if self.listen:
                await tg.start(self._listen_loop)
            else:
                self.listening.set()
            tg.start_soon(self._poll_loop)
            for slots in self.slots.values():
                self._start_saga(slots)
            task_status.started()

    async def stop(self, grace: float) -> None:
        """Stop claiming, let running steps finish (up to `grace` seconds), then cancel."""
        self.stopping = True
        for slots in self.slots.values():
            slots.wake.set()
        with anyio.move_on_after(grace):
            await self._idle.wait()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    def serve(self, binding: Binding) -> None:
        """Start (or update) serving a saga."""
        existing = self.slots.get(binding.saga.name)
        if existing is not None:
            existing.binding = binding
            return
        slots = _Slots(binding)
        self.slots[binding.saga.name] = slots
        if self._tg is not None:
            self._start_saga(slots)
        self._poll_now = True
        self._poke.set()

    def _start_saga(self, slots: _Slots) -> None:
        assert self._tg is not None
        if not slots.loop_started:
            slots.loop_started = True
            self._tg.start_soon(self._saga_loop, slots)
            slots.wake.set()

    # -- waking ----------------------------------------------------------------------------

    def wake(self, saga: str) -> None:
        slots = self.slots.get(saga)
        if slots is not None:
            slots.wake.set()

    def wake_in(self, seconds: float) -> None:
        """Make sure the poll loop looks again in `seconds` (a run of ours is due then)."""
        due = time.monotonic() + seconds
        if self._timer is None or due < self._timer:
            self._timer = due
            self._poke.set()

    def wake_all(self) -> None:
        for slots in self.slots.values():
            slots.wake.set()

    def has_capacity(self, saga: str) -> bool:
        slots = self.slots.get(saga)
        return slots is not None and slots.active < slots.binding.saga.instances

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        # Only flag work here: the database is never touched from a notification callback.
        if not isinstance(payload, str):
            return
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
        delay = 0.1
        started = False
        while not self.stopping:
            lost = anyio.Event()
            try:
                conn = await self.connect_listener()
            except RETRYABLE as exc:
                log.warning("listen connection failed; retrying", error=str(exc), delay=delay)
                if not started:
                    started = True
                    task_status.started()
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            try:
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(self.store.channel, self._on_notify)
                delay = 0.1
                self.listening.set()
                if not started:
                    started = True
                    task_status.started()
                else:
                    # Notifications sent while we were away are lost: look for work.
                    self.wake_all()
                    self.on_root_done(None)
                await lost.wait()
                log.warning("listen connection lost; reconnecting")
            finally:
                with anyio.CancelScope(shield=True):
                    if not conn.is_closed():
                        await conn.close(timeout=2)

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
            sagas = list(self.slots)
            if not sagas:
                continue
            try:
                async with self.pool.acquire() as conn:
                    due, db_now = await self.store.poll(conn, sagas)
            except RETRYABLE as exc:
                log.warning("poll failed", error=str(exc))
                continue
            assert db_now is not None
            for saga, ready_at in due:
                if ready_at is None:
                    continue
                if ready_at <= db_now:
                    self.wake(saga)
                else:
                    # Wake just after the earliest due time; never busy-wait.
                    self.wake_in((ready_at - db_now).total_seconds() + 0.001)

    async def _saga_loop(self, slots: _Slots) -> None:
        assert self._tg is not None
        while not self.stopping:
            await slots.wake.wait()
            slots.wake = anyio.Event()
            if self.stopping:
                break
            if slots.active < slots.binding.saga.instances:
                self._enter(slots)
                self._tg.start_soon(self._slot, slots)

    def _enter(self, slots: _Slots) -> None:
        slots.active += 1
        self._busy += 1
        if self._idle.is_set():
            self._idle = anyio.Event()

    def _leave(self, slots: _Slots) -> None:
        slots.active -= 1
        self._busy -= 1
        if self._busy == 0:
            self._idle.set()

    async def _slot(self, slots: _Slots) -> None:
        failures = 0
        try:
            while not self.stopping:
                try:
                    async with self.pool.acquire() as conn:
                        got = await self.runner.run_next(conn, slots.binding)
                    failures = 0
                except anyio.get_cancelled_exc_class():
                    raise
                except Exception as exc:
                    failures += 1
                    delay = min(5.0, 0.05 * math.pow(2, failures))
                    log.warning(
                        "step transaction failed; retrying",
                        saga=slots.binding.saga.name,
                        error=repr(exc),
                        delay=delay,
                    )
                    await anyio.sleep(delay)
                    continue
                if not got:
                    break
                if slots.active < slots.binding.saga.instances:
                    slots.wake.set()  # there may be more: let another slot join
        finally:
            self._leave(slots)
