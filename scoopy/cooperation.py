"""Cooperation: the entry point — connect, migrate, subscribe sagas, launch, wait, inspect."""

from __future__ import annotations

import os
import socket
import uuid
import weakref
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import anyio
import asyncpg
import msgspec
import structlog

from . import periodic
from .context import CooperationContext
from .engine import migrate as migrations
from .engine.runner import Advanced, Binding, RollbackRequest, Runner
from .engine.store import Connection, NewMessage, Store
from .engine.worker import Worker
from .errors import DatabaseUnavailableError, SagaDefinitionError, ScoopyError, check_schema
from .failure import (
    CancellationRequested,
    CooperationError,
    CooperationFailure,
    RollbackRequested,
)
from .ids import uuid7
from .message import Topic, as_topic
from .postgres import embedded_dsn
from .saga import Saga
from .scope import ContextArg

log = structlog.get_logger("scoopy")

Status = Literal["committed", "rolled_back", "rollback_failed"]


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of a hierarchy's event log."""

    seq: int
    type: str
    saga: str | None
    step: str | None
    run_id: uuid.UUID | None
    message_id: uuid.UUID | None
    root_id: uuid.UUID
    lineage: list[uuid.UUID]
    worker: str | None
    failure: CooperationFailure | None
    context: dict[str, Any] | None
    time: datetime
    phase: str | None = None
    instance: int | None = None
    iteration: int | None = None
    handler_iteration: int | None = None


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One run of a hierarchy, as `Cooperation.runs` reports it."""

    id: uuid.UUID
    saga: str
    parent_id: uuid.UUID | None
    status: str
    lineage: list[uuid.UUID]
    message_id: uuid.UUID
    created_at: datetime
    updated_at: datetime
    failure: CooperationFailure | None
    rollback_failure: CooperationFailure | None


def _failure(data: str | None) -> CooperationFailure | None:
    return None if data is None else CooperationFailure.from_json(data)


@dataclass(frozen=True, slots=True)
class RunSummary:
    id: uuid.UUID
    saga: str
    status: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a hierarchy ended: every run its root message started has finished."""

    id: uuid.UUID
    status: Status
    failure: CooperationFailure | None
    runs: tuple[RunSummary, ...]

    def raise_for_failure(self) -> None:
        """Raise the failure (a `CooperationError`) unless the hierarchy committed."""
        if self.failure is not None:
            raise self.failure.to_exception()


class RunHandle:
    """A launched message and the hierarchy it started."""

    def __init__(self, coop: Cooperation, root_id: uuid.UUID, topic: str) -> None:
        self.coop = coop
        self.id = root_id
        self.topic = topic
        # Set when this process learns the hierarchy finished; handles from `launch` listen
        # from the start, so waiting needs no query before the news arrives.
        self.finished: anyio.Event | None = None

    async def wait(self, timeout: float | None = None) -> Outcome:
        """Wait until every run the message started has finished (TimeoutError after `timeout`)."""
        return await self.coop.wait(self.id, timeout, self.finished)

    async def events(self) -> list[Event]:
        return await self.coop.events(self.id)

    def __repr__(self) -> str:
        return f"<RunHandle {self.topic} {self.id}>"


def _resolve_dsn(dsn: str | None) -> str | None:
    return dsn or os.environ.get("SCOOPY_DSN") or None


def _redact(dsn: str) -> str:
    if "@" in dsn and "://" in dsn:
        scheme, rest = dsn.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return dsn


class Cooperation:
    """Connects to PostgreSQL, migrates the schema and runs the sagas subscribed to it.

    Use as `async with Cooperation(dsn) as coop:`. Without a DSN it uses `$SCOOPY_DSN`, else
    an embedded PostgreSQL. `schema` defaults to `$SCOOPY_SCHEMA`, else "scoopy".
    `listen=False` is the poll-only mode for connection poolers that do not pass
    LISTEN/NOTIFY (PgBouncer in transaction mode).
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str | None = None,
        migrate: bool = True,
        listen: bool = True,
        poll_interval: float | None = None,
        worker: bool = True,
        pool_size: int = 20,
        max_depth: int = 64,
        max_recursion: int = 16,
        shutdown_grace: float = 30.0,
        connect_timeout: float = 10.0,
        data_dir: Path | str | None = None,
        server_settings: dict[str, str] | None = None,
    ) -> None:
        self.dsn = dsn
        self.schema = check_schema(schema or os.environ.get("SCOOPY_SCHEMA") or "scoopy")
        self.migrate = migrate
        self.listen = listen
        self.poll_interval = poll_interval or (1.0 if listen else 0.25)
        self.run_worker = worker
        self.pool_size = pool_size
        self.max_depth = max_depth
        self.max_recursion = max_recursion
        self.shutdown_grace = shutdown_grace
        self.connect_timeout = connect_timeout
        self.data_dir = Path(data_dir) if data_dir is not None else None
        # Generic plans: scoopy's statements are index lookups whose plan never depends on
        # the parameters, and planning them cost more than running them.
        self.server_settings = {
            "jit": "off",
            "plan_cache_mode": "force_generic_plan",
            "application_name": "scoopy",
        }
        self.server_settings.update(server_settings or {})
        self.worker_id = f"{socket.gethostname()}/{os.getpid()}/{uuid7().hex[-8:]}"
        self.store = Store(self.schema)
        self.bindings: dict[str, Binding] = {}
        self._unsynced: list[tuple[Literal["+", "-"], str, str]] = []
        self._sync_lock = anyio.Lock()
        self._sync_wanted: anyio.Event | None = None
        self._waiters: dict[uuid.UUID, set[anyio.Event]] = {}
        self._launched: weakref.WeakValueDictionary[uuid.UUID, RunHandle] = (
            weakref.WeakValueDictionary()
        )
        self.own_backends: set[int] = set()
        self.dirty_backends: set[int] = set()
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._worker: Worker | None = None
        self._stack: AsyncExitStack | None = None
        self._resolved_dsn: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Cooperation:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        if self._stack is not None:
            raise ScoopyError("this Cooperation is already started")
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            dsn = _resolve_dsn(self.dsn)
            if dsn is None:
                dsn = await anyio.to_thread.run_sync(embedded_dsn, self.data_dir)
            self._resolved_dsn = dsn
            self._pool = await self._connect_pool(dsn)
            stack.push_async_callback(self._close_pool)
            async with self._pool.acquire() as conn:
                if self.migrate:
                    await migrations.migrate(conn, self.store)
                else:
                    await migrations.ensure_current(conn, self.store)
            if self.run_worker and periodic.PERIODIC not in self.bindings:
                self.subscribe(periodic.SCHEDULES, periodic.build())
            await self._sync_subscriptions()
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)
            self._sync_wanted = anyio.Event()
            tg.start_soon(self._syncer)
            if self.run_worker:
                runner = Runner(
                    self.store,
                    self.worker_id,
                    listen=self.listen,
                    max_depth=self.max_depth,
                    max_recursion=self.max_recursion,
                    on_committed=self._on_committed,
                    bindings=self.bindings,
                )
                self._worker = Worker(
                    self._pool,
                    self.store,
                    runner,
                    listen=self.listen,
                    poll_interval=self.poll_interval,
                    connect_listener=self._connect_listener,
                    on_root_done=self._root_done,
                    own_backends=self.own_backends,
                    dirty_backends=self.dirty_backends,
                )
                for binding in self.bindings.values():
                    self._worker.serve(binding)
                await tg.start(self._worker.run)
                stack.push_async_callback(self._stop_worker)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack

    async def close(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def _stop_worker(self) -> None:
        if self._worker is not None:
            await self._worker.stop(self.shutdown_grace)

    async def _close_pool(self) -> None:
        if self._pool is not None:
            with anyio.CancelScope(shield=True):
                await self._pool.close()

    async def _connect_pool(self, dsn: str) -> asyncpg.Pool[asyncpg.Record]:
        try:
            pool = await asyncpg.create_pool(
                dsn,
                init=self._remember_backend,
                reset=self._reset_if_used,
                min_size=1,
                max_size=self.pool_size,
                timeout=self.connect_timeout,
                server_settings=self.server_settings,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise DatabaseUnavailableError(
                f"could not connect to PostgreSQL at {_redact(dsn)}: {exc}"
            ) from exc
        assert pool is not None
        return pool

    async def _remember_backend(self, conn: asyncpg.Connection[asyncpg.Record]) -> None:
        # Notifications from our own connections announce what this process has already
        # woken itself for; the listener skips them (see Worker._on_notify).
        pid = conn.get_server_pid()
        self.own_backends.add(pid)
        conn.add_termination_listener(lambda _conn: self.own_backends.discard(pid))

    async def _reset_if_used(self, conn: asyncpg.Connection[asyncpg.Record]) -> None:
        # scoopy's own statements leave no session state behind; a session that user code
        # used (a step's `scope.connection`) gets asyncpg's full reset before it is reused.
        pid = conn.get_server_pid()
        if pid in self.dirty_backends:
            self.dirty_backends.discard(pid)
            await conn.execute(conn.get_reset_query())

    async def _connect_listener(self) -> asyncpg.Connection[asyncpg.Record]:
        assert self._resolved_dsn is not None
        return await asyncpg.connect(
            self._resolved_dsn,
            timeout=self.connect_timeout,
            server_settings={"application_name": "scoopy-listen"},
        )

    @property
    def pool(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise ScoopyError("the Cooperation is not started: use `async with Cooperation(...)`")
        return self._pool

    # -- subscriptions ---------------------------------------------------------------------

    def subscribe(self, topic: Topic[Any] | str, saga: Saga) -> None:
        """Run `saga` for every message on `topic` (persisted in the `subscription` table)."""
        resolved = as_topic(topic)
        saga.validate()
        binding = self.bindings.get(saga.name)
        if binding is None:
            binding = self.bindings[saga.name] = Binding(saga)
        elif binding.saga is not saga:
            raise SagaDefinitionError(
                f"another saga named {saga.name!r} is already subscribed here"
            )
        binding.topics[resolved.name] = resolved
        self._unsynced.append(("+", resolved.name, saga.name))
        if self._sync_wanted is not None:
            self._sync_wanted.set()
        if self._worker is not None:
            self._worker.serve(binding)

    def unsubscribe(self, topic: Topic[Any] | str, saga: Saga) -> None:
        """Stop running `saga` for messages on `topic`.

        New messages no longer start it. Its runs on that topic that have not started are
        skipped (their parents stop waiting for them); runs already started finish as long
        as some worker still serves the saga. Written in the background at once;
        `await coop.sync()` waits until it is.
        """
        name = as_topic(topic).name
        binding = self.bindings.get(saga.name)
        if binding is not None:
            binding.topics.pop(name, None)
        self._unsynced.append(("-", name, saga.name))
        if self._sync_wanted is not None:
            self._sync_wanted.set()

    async def _sync_subscriptions(self) -> None:
        if not self._unsynced and not self._sync_lock.locked():
            return  # (a sync in flight may still be writing what a launch must see)
        async with self._sync_lock:
            changes, self._unsynced = self._unsynced, []
            if not changes:
                return
            ready: list[str] = []
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    for sign, topic, saga in changes:
                        if sign == "+":
                            await self.store.subscribe(conn, [(topic, saga)])
                        else:
                            _, woken = await self.store.unsubscribe(conn, topic, saga, self.listen)
                            ready += woken
            except BaseException:
                self._unsynced[:0] = changes  # not written: the next sync tries again
                raise
            for saga in ready:
                self._wake(saga)
            self._root_done(None)  # skipped root runs may have finished a hierarchy

    async def _syncer(self) -> None:
        """Write subscription changes made after start in the background, right away."""
        assert self._sync_wanted is not None
        while True:
            await self._sync_wanted.wait()
            self._sync_wanted = anyio.Event()
            try:
                await self._sync_subscriptions()
            except Exception as exc:
                log.warning("could not write subscriptions; retrying", error=repr(exc))
                await anyio.sleep(1.0)
                self._sync_wanted.set()

    async def sync(self) -> None:
        """Write pending subscribe/unsubscribe calls to the registry now."""
        await self._sync_subscriptions()

    async def pause(self, saga: Saga | str, reason: str | None = None) -> None:
        """Stop every worker from running steps of `saga` (its runs wait) until `resume`."""
        name = saga.name if isinstance(saga, Saga) else saga
        async with self.pool.acquire() as conn:
            await self.store.pause(conn, name, reason)

    async def resume(self, saga: Saga | str) -> None:
        """Let workers run `saga` again."""
        name = saga.name if isinstance(saga, Saga) else saga
        async with self.pool.acquire() as conn:
            await self.store.resume(conn, name, self.listen)
        self._wake(name)

    async def paused(self) -> list[str]:
        async with self.pool.acquire() as conn:
            return await self.store.paused(conn)

    async def subscriptions(self) -> list[tuple[str, str]]:
        """Every (topic, saga) pair in the registry, from all services."""
        await self._sync_subscriptions()
        async with self.pool.acquire() as conn:
            return await self.store.subscriptions(conn)

    # -- launching -------------------------------------------------------------------------

    def _topic(self, topic: Topic[Any] | str) -> Topic[Any]:
        if isinstance(topic, Topic):
            return topic
        for binding in self.bindings.values():
            known = binding.topics.get(topic)
            if known is not None:
                return known
        return Topic(topic)

    async def launch(
        self,
        topic: Topic[Any] | str,
        payload: Any,
        context: ContextArg = None,
        connection: Connection | None = None,
        *,
        key: str | None = None,
        at: datetime | None = None,
        after: timedelta | float | None = None,
    ) -> RunHandle:
        """Launch a root message and return a handle on the hierarchy it starts.

        - `connection`: join that open transaction (transactional outbox).
        - `key`: at most one hierarchy per key; a second launch returns the first's handle.
        - `at` / `after`: its runs start at that time (durable; survives restarts).
        """
        resolved = self._topic(topic)
        body = resolved.encode(payload)
        encoded = CooperationContext.coerce(context).encode()
        if at is not None and after is not None:
            raise ScoopyError("pass `at` or `after`, not both")
        if at is not None and at.utcoffset() is None:
            raise ScoopyError(f"`at` must be timezone-aware, got {at!r}")
        delay = after.total_seconds() if isinstance(after, timedelta) else after
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 500):
            raise ScoopyError(f"`key` must be a string of 1-500 characters, got {key!r}")
        root = uuid7()
        message = NewMessage(
            id=root,
            root_id=root,
            topic=resolved.name,
            payload=body.decode(),
            context=None if encoded is None else encoded.decode(),
            instance=None,
            key=key,
        )
        await self._sync_subscriptions()
        handle = RunHandle(self, root, resolved.name)
        if self._worker is not None and self.listen:
            # This process hears of every finish (its own, and others' by notification).
            handle.finished = anyio.Event()
            self._launched[root] = handle  # before the runs can exist: no news is missed
        if connection is not None:
            root, sagas = await self.store.launch(
                connection, message, self.worker_id, self.listen, at=at, after=delay
            )
        else:
            async with self.pool.acquire() as conn:
                root, sagas = await self.store.launch(
                    conn, message, self.worker_id, self.listen, at=at, after=delay
                )
            if self._worker is not None and (at is not None or delay):
                due_in = delay or 0.0
                if at is not None:
                    due_in = (at - datetime.now(at.tzinfo)).total_seconds()
                self._worker.wake_in(max(0.0, due_in))
            for saga in sagas:
                self._wake(saga)
        if root != handle.id or not sagas:
            # An existing hierarchy (its key was taken) or one with no runs: no news will come.
            self._launched.pop(handle.id, None)
            handle = RunHandle(self, root, resolved.name)
        return handle

    async def schedule(
        self,
        key: str,
        topic: Topic[Any] | str,
        payload: Any,
        *,
        every: timedelta | float | None = None,
        cron: str | None = None,
        context: ContextArg = None,
        start_at: datetime | None = None,
        catch_up: periodic.CatchUp = "latest",
    ) -> RunHandle:
        """Launch `payload` on `topic` periodically: `every` N seconds or on a `cron` expression.

        `key` names the schedule: while it is active, scheduling the same key again changes
        nothing (after `unschedule` it starts a new one). Each firing
        is its own hierarchy and fires exactly once, whatever the number of workers or
        restarts; see `scoopy.periodic` for the catch-up policies.
        """
        seconds = periodic.check_cadence(every, cron)
        if start_at is not None and start_at.utcoffset() is None:
            raise ScoopyError(f"`start_at` must be timezone-aware, got {start_at!r}")
        if catch_up not in ("latest", "all"):
            raise ScoopyError(f"catch_up must be 'latest' or 'all', got {catch_up!r}")
        resolved = self._topic(topic)
        body = resolved.encode(payload)
        encoded = CooperationContext.coerce(context).encode()
        chain = periodic.chain_key(key)
        async with self.pool.acquire() as conn, conn.transaction():
            # Check and launch under one lock so two services scheduling at once start one chain.
            await self.store.lock(conn, chain)
            active = await self.store.active_chains(conn, periodic.PERIODIC, chain, chain + "@")
            if active:
                return RunHandle(self, active[0], periodic.PERIODIC)
            now = await self.store.now(conn)
            await self.store.subscribe(conn, [(periodic.PERIODIC, periodic.PERIODIC)])
            start = start_at or (now + timedelta(seconds=seconds) if seconds is not None else now)
            link = periodic.first_link(
                key, resolved.name, body, encoded, seconds, cron, start, catch_up, uuid7().hex
            )
            handle = await self.launch(
                periodic.SCHEDULES, link, connection=conn, key=periodic.chain_key(key, link)
            )
        if self._worker is not None:
            self._worker.wake_in(max(0.0, (link.due - now).total_seconds()))
        return handle

    async def schedules(self) -> list[periodic.Schedule]:
        """The active schedules: key, topic, cadence and when each next fires (`due`)."""
        async with self.pool.acquire() as conn:
            links = await self.store.schedule_links(conn, periodic.PERIODIC)
        return [periodic.SCHEDULES.decode(link) for link in links]

    async def unschedule(self, key: str, reason: str = "unscheduled") -> int:
        """Stop a schedule; return how many pending links of its chain were cancelled."""
        cancelled = 0
        while True:
            async with self.pool.acquire() as conn:
                roots = await self.store.active_chains(
                    conn, periodic.PERIODIC, periodic.chain_key(key), periodic.chain_key(key) + "@"
                )
            if not roots:
                return cancelled
            for root in roots:
                await self.cancel(root, reason)
            # A link that was firing while we cancelled may have queued one more: look again
            # once these have finished.
            for root in roots:
                await self.wait(root)
            cancelled += len(roots)

    def handle(self, root_id: uuid.UUID | str) -> RunHandle:
        """A handle for a hierarchy launched earlier (by id)."""
        return RunHandle(self, uuid.UUID(str(root_id)), "")

    # -- waiting ---------------------------------------------------------------------------

    def _wake(self, saga: str) -> None:
        if self._worker is not None:
            self._worker.wake(saga)

    def _on_committed(self, advanced: Advanced) -> None:
        for saga in advanced.ready_sagas:
            self._wake(saga)
        if advanced.wake_in is not None and self._worker is not None:
            self._worker.wake_in(advanced.wake_in)
        if advanced.root_done is not None:
            self._root_done(advanced.root_done)

    def _root_done(self, root_id: uuid.UUID | None) -> None:
        """Wake whoever waits for `root_id` (None: everyone, after a lost connection)."""
        targets = self._waiters.values() if root_id is None else [self._waiters.get(root_id, set())]
        for events in targets:
            for event in events:
                event.set()
        handles = self._launched.values() if root_id is None else [self._launched.get(root_id)]
        for handle in handles:
            if handle is not None and handle.finished is not None:
                handle.finished.set()

    async def wait(
        self,
        root_id: uuid.UUID,
        timeout: float | None = None,
        finished: anyio.Event | None = None,
    ) -> Outcome:
        """Wait for a hierarchy's outcome (see `RunHandle.wait`)."""
        with anyio.fail_after(timeout):
            if finished is not None:
                # Registered before the launch committed: nothing can be missed, and the
                # poll interval bounds the wait if the news comes from another process
                # without notifications.
                with anyio.move_on_after(self.poll_interval):
                    await finished.wait()
            while True:
                event = anyio.Event()
                self._waiters.setdefault(root_id, set()).add(event)
                try:
                    outcome = await self.outcome(root_id)
                    if outcome is not None:
                        return outcome
                    with anyio.move_on_after(self.poll_interval):
                        await event.wait()
                finally:
                    waiting = self._waiters.get(root_id)
                    if waiting is not None:
                        waiting.discard(event)
                        if not waiting:
                            del self._waiters[root_id]

    async def outcome(self, root_id: uuid.UUID) -> Outcome | None:
        """The hierarchy's outcome, or None while any of its root runs is unfinished.

        `root_id` may also be a run id: then it is that run's outcome.
        """
        async with self.pool.acquire() as conn:
            runs = await self.store.root_runs(conn, root_id)
            if not runs and not await self.store.message_exists(conn, root_id):
                run = await self.store.run_by_id(conn, root_id)
                if run is None:
                    raise LookupError(f"no message or run {root_id} in schema {self.schema!r}")
                runs = [run]
        if any(run.status in ("pending", "active") for run in runs):
            return None
        failures: list[CooperationFailure] = []
        status: Status = "committed"
        for run in runs:
            if run.status == "rollback_failed":
                status = "rollback_failed"
                if run.rollback_failure is not None:
                    failures.append(CooperationFailure.from_json(run.rollback_failure))
            elif run.status == "rolled_back":
                if status == "committed":
                    status = "rolled_back"
                if run.failure is not None:
                    failures.append(CooperationFailure.from_json(run.failure))
        failure = None
        if len(failures) == 1:
            failure = failures[0]
        elif failures:
            failure = CooperationFailure(
                type=CooperationError.wire_type,
                message=f"{len(failures)} runs started by message {root_id} failed",
                source="scoopy",
                causes=failures,
            )
        summaries = tuple(RunSummary(run.id, run.saga, run.status) for run in runs)
        return Outcome(root_id, status, failure, summaries)

    # -- inspecting ------------------------------------------------------------------------

    async def events(self, root_id: uuid.UUID) -> list[Event]:
        """The hierarchy's event log, in order."""
        async with self.pool.acquire() as conn:
            rows = await self.store.events(conn, root_id)
        return [
            Event(
                seq=row["seq"],
                type=row["type"],
                saga=row["saga"],
                step=row["step"],
                run_id=row["run_id"],
                message_id=row["message_id"],
                root_id=row["root_id"],
                lineage=list(row["lineage"]),
                worker=row["worker"],
                failure=None
                if row["failure"] is None
                else CooperationFailure.from_json(row["failure"]),
                context=None if row["context"] is None else msgspec.json.decode(row["context"]),
                time=row["created_at"],
                phase=row["phase"],
                instance=row["instance"],
                iteration=row["iteration"],
                handler_iteration=row["handler_iteration"],
            )
            for row in rows
        ]

    async def runs(self, root_id: uuid.UUID) -> list[RunInfo]:
        """Every run of a hierarchy, oldest first."""
        async with self.pool.acquire() as conn:
            rows = await self.store.runs_of(conn, root_id)
        return [
            RunInfo(
                id=row["id"],
                saga=row["saga"],
                parent_id=row["parent_id"],
                status=row["status"],
                lineage=list(row["lineage"]),
                message_id=row["message_id"],
                created_at=row["created_at"],
                updated_at=row["updated_at"],
                failure=_failure(row["failure"]),
                rollback_failure=_failure(row["rollback_failure"]),
            )
            for row in rows
        ]

    # -- control ---------------------------------------------------------------------------

    async def _locate(
        self, conn: Connection, target: uuid.UUID
    ) -> tuple[uuid.UUID, list[uuid.UUID]]:
        found = await self.store.find_root(conn, target)
        if found is None:
            raise LookupError(f"no run or root message {target} in schema {self.schema!r}")
        return found

    async def cancel(self, run_id: uuid.UUID | str, reason: str, source: str = "operator") -> bool:
        """Ask a hierarchy (or the sub-tree under one run) to give up and roll back.

        Returns False if cancellation had already been requested for that target.
        """
        target = uuid.UUID(str(run_id))
        failure = CancellationRequested.build(reason, source).failure
        async with self.pool.acquire() as conn:
            root_id, lineage = await self._locate(conn, target)
            inserted = await self.store.cancel(
                conn,
                target,
                root_id,
                lineage,
                failure.to_json().decode(),
                self.worker_id,
                self.listen,
            )
        if self._worker is not None:
            self._worker.wake_all()
        return inserted

    async def rollback(
        self, run_id: uuid.UUID | str, reason: str, source: str = "operator"
    ) -> RunHandle:
        """Undo a finished, committed hierarchy (or one committed run's sub-tree)."""
        target = uuid.UUID(str(run_id))
        failure = RollbackRequested.build(reason, source).failure
        request = msgspec.json.encode(RollbackRequest("external", failure)).decode()
        async with self.pool.acquire() as conn, conn.transaction():
            root_id, _ = await self._locate(conn, target)
            candidates = await self.store.undo_candidates(conn, root_id, target)
            topic = (
                await self.store.topic_of(conn, candidates[0]["message_id"]) if candidates else ""
            )
            if await self.store.unfinished(conn, root_id):
                raise ScoopyError(
                    f"hierarchy {root_id} is still running: cancel it instead of undoing it"
                )
            if not candidates:
                raise ScoopyError(f"{target} started no runs: there is nothing to undo")
            not_committed = [row for row in candidates if row["status"] != "committed"]
            if not_committed:
                states = ", ".join(f"{row['saga']} is {row['status']}" for row in not_committed)
                raise ScoopyError(f"only committed runs can be undone: {states}")
            await self.store.undo(
                conn,
                [row["id"] for row in candidates],
                request,
                failure.to_json().decode(),
                self.worker_id,
                self.listen,
            )
        if self._worker is not None:
            self._worker.wake_all()
        # Undoing a sub-tree is waited on by its run: the root itself stays committed.
        return RunHandle(self, root_id if target == root_id else target, topic)
