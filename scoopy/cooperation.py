"""Cooperation: the entry point — connect, migrate, subscribe sagas, launch, wait, inspect.

This is a façade: the connections live in `engine.database`, the subscriptions in
`engine.registry`, waiting in `engine.waiting`, operators' requests in `engine.control`, and
every statement in `engine.store`.
"""

from __future__ import annotations

import functools
import os
import socket
import uuid
from contextlib import AsyncExitStack
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg

from . import periodic
from .context import CooperationContext
from .engine import control
from .engine import migrate as migrations
from .engine.background import Background
from .engine.database import SERVER_SETTINGS, Database
from .engine.liveness import Liveness
from .engine.records import AfterCommit
from .engine.registry import Registry
from .engine.runner import Runner
from .engine.step import StepSettings
from .engine.store import Store
from .engine.topology import KnownDefinitions, TopologyStore
from .engine.waiting import Waiters, Watch, outcome_of, waiting_for
from .engine.worker import Worker
from .errors import ScoopyError, UnhandledTopicError, WaitTimeout, check_schema
from .ids import uuid7
from .message import NewMessage, Topic, as_topic, check_priority
from .results import Event, Outcome, RunInfo, SubscriptionInfo, Waiting
from .saga import Saga
from .scope import ContextArg
from .vocab import Connection


def _saga_name(saga: Saga | str) -> str:
    if isinstance(saga, Saga):
        return saga.name
    if isinstance(saga, str) and saga:
        return saga
    raise ScoopyError(f"expected a Saga or a saga's name, got {saga!r}")


class RunHandle:
    """A launched message and the hierarchy it started."""

    def __init__(
        self, coop: Cooperation, root_id: uuid.UUID, topic: str, watch: Watch | None = None
    ) -> None:
        self.coop = coop
        self.id = root_id
        self.topic = topic
        # Set when this process learns the hierarchy finished; handles from `launch` watch
        # from the start, so waiting needs no query before the news arrives.
        self.watch = watch

    async def wait(self, timeout: float | None = None) -> Outcome:
        """Wait until every run the message started has finished.

        After `timeout` seconds it raises `WaitTimeout` (a `TimeoutError`) saying what the
        hierarchy still waits for.
        """
        return await self.coop._wait(self.id, timeout, self.watch)

    async def events(self) -> list[Event]:
        return await self.coop.events(self.id)

    def __repr__(self) -> str:
        return f"<RunHandle {self.topic} {self.id}>"


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
        heartbeat: float = 5.0,
        liveness_timeout: float = 30.0,
        subscription_ttl: float | None = 600.0,
    ) -> None:
        self.dsn = dsn
        self.schema = check_schema(schema or os.environ.get("SCOOPY_SCHEMA") or "scoopy")
        self.migrate = migrate
        self.listen = listen
        self.poll_interval = poll_interval or (1.0 if listen else 0.25)
        self.run_worker = worker
        self.max_depth = max_depth
        self.max_recursion = max_recursion
        self.shutdown_grace = shutdown_grace
        self.data_dir = Path(data_dir) if data_dir is not None else None
        for what, value in (("heartbeat", heartbeat), ("liveness_timeout", liveness_timeout)):
            if not (isinstance(value, int | float) and 0 < value < float("inf")):
                raise ScoopyError(f"`{what}` must be a positive number of seconds, got {value!r}")
        if liveness_timeout <= heartbeat:
            raise ScoopyError(
                f"`liveness_timeout` ({liveness_timeout}) must be longer than `heartbeat` "
                f"({heartbeat}), or every worker would look dead between two heartbeats"
            )
        if subscription_ttl is not None and not subscription_ttl > liveness_timeout:
            raise ScoopyError(
                f"`subscription_ttl` must be None or longer than `liveness_timeout`, "
                f"got {subscription_ttl!r}"
            )
        self.heartbeat = heartbeat
        self.liveness_timeout = liveness_timeout
        self.subscription_ttl = subscription_ttl
        self.server_settings = {**SERVER_SETTINGS, **(server_settings or {})}
        self.worker_id = f"{socket.gethostname()}/{os.getpid()}/{uuid7().hex[-8:]}"
        self.store = Store(self.schema)
        self.topology_store = TopologyStore(self.store)
        self.control = control.Control(self.store, self.worker_id, listen)
        self.database = Database(
            pool_size=pool_size,
            connect_timeout=connect_timeout,
            server_settings=self.server_settings,
        )
        self.registry = Registry(
            self.store,
            self.topology_store,
            self.database,
            listen=listen,
            on_ready=self._wake,
            on_done=lambda: self.waiters.done(None),
        )
        self.bindings = self.registry.bindings
        self.definitions = KnownDefinitions(self.topology_store)
        self.waiters = Waiters(self.poll_interval)
        self._worker: Worker | None = None
        self._background = Background()
        self._stack: AsyncExitStack | None = None

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
            await self.database.open(self.dsn, self.data_dir)
            stack.push_async_callback(self.database.close)
            async with self.database.connection() as conn:
                if self.migrate:
                    await migrations.migrate(conn, self.store)
                else:
                    await migrations.ensure_current(conn, self.store)
            if self.run_worker and periodic.PERIODIC not in self.bindings:
                self.subscribe(periodic.SCHEDULES, periodic.build())
            await self.registry.sync()
            worker = self._start_worker() if self.run_worker else None
            await self._background.start(self.registry.run, worker)
            stack.push_async_callback(self._background.stop, self.shutdown_grace)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack

    def _start_worker(self) -> Worker:
        settings = StepSettings(
            store=self.store,
            worker=self.worker_id,
            listen=self.listen,
            max_depth=self.max_depth,
            max_recursion=self.max_recursion,
            bindings=self.bindings,
            definitions=self.definitions,
            topology=self.topology_store,
        )
        liveness = Liveness(
            self.store,
            self.topology_store,
            self.database,
            self.worker_id,
            self.bindings,
            self.definitions,
            listen=self.listen,
            interval=self.heartbeat,
            timeout=self.liveness_timeout,
            ttl=self.subscription_ttl,
            on_ready=self._wake,
        )
        self._worker = Worker(
            self.database,
            self.store,
            Runner(settings, self._on_committed),
            liveness,
            listen=self.listen,
            poll_interval=self.poll_interval,
            on_root_done=self.waiters.done,
        )
        for binding in self.bindings.values():
            self._worker.serve(binding)
        return self._worker

    async def close(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    @property
    def pool(self) -> asyncpg.Pool[asyncpg.Record]:
        return self.database.pool

    # -- subscriptions ---------------------------------------------------------------------

    def subscribe(self, topic: Topic[Any] | str, saga: Saga) -> None:
        """Run `saga` for every message on `topic` (persisted in the `subscription` table)."""
        resolved = as_topic(topic)
        saga.validate()
        binding = self.registry.add(resolved, saga)
        if self._worker is not None:
            self._worker.serve(binding)

    def unsubscribe(self, topic: Topic[Any] | str, saga: Saga | str) -> None:
        """Stop running `saga` for messages on `topic`.

        New messages no longer start it. Its runs on that topic that have not started are
        skipped (their parents stop waiting for them); runs already started finish as long
        as some worker still serves the saga. Written in the background at once;
        `await coop.sync()` waits until it is.
        """
        self.registry.remove(as_topic(topic).name, _saga_name(saga))

    async def sync(self) -> None:
        """Write pending subscribe/unsubscribe calls to the registry now."""
        await self.registry.sync()

    async def pause(self, saga: Saga | str, reason: str | None = None) -> None:
        """Stop every worker from running steps of `saga` (its runs wait) until `resume`."""
        name = _saga_name(saga)
        async with self.database.connection() as conn:
            await self.store.pause(conn, name, reason)

    async def resume(self, saga: Saga | str) -> None:
        """Let workers run `saga` again."""
        name = _saga_name(saga)
        async with self.database.connection() as conn:
            await self.store.resume(conn, name, self.listen)
        self._wake(name)

    async def paused(self) -> list[str]:
        async with self.database.connection() as conn:
            return await self.store.paused(conn)

    async def subscriptions(self) -> list[tuple[str, str]]:
        """Every (topic, saga) pair in the registry, from all services."""
        await self.registry.sync()
        async with self.database.connection() as conn:
            return await self.store.subscriptions(conn)

    async def topology(self) -> list[SubscriptionInfo]:
        """Every subscription in the registry, with the live workers that serve its saga."""
        await self.registry.sync()
        async with self.database.connection() as conn:
            return await self.topology_store.topology(conn, self.liveness_timeout)

    # -- launching -------------------------------------------------------------------------

    def _topic(self, topic: Topic[Any] | str) -> Topic[Any]:
        if isinstance(topic, Topic):
            return topic
        return self.registry.known_topic(topic) or Topic(topic)

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
        priority: int = 0,
        allow_unhandled: bool = False,
    ) -> RunHandle:
        """Launch a root message and return a handle on the hierarchy it starts.

        - `connection`: join that open transaction (transactional outbox).
        - `key`: at most one hierarchy per key; a second launch returns the first's handle.
        - `at` / `after`: its runs start at that time (durable; survives restarts).
        - `priority`: sagas that declare `priorities=True` claim higher ones sooner.

        A topic no saga subscribes to in the shared registry raises `UnhandledTopicError`,
        and nothing is written: runs are created when the message is, so it would never run.
        `allow_unhandled=True` launches it anyway; its outcome is then "unhandled".
        """
        check_priority(priority)
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
            priority=priority,
        )
        await self.registry.sync()
        watch = None
        if self._worker is not None and self.listen:
            # This process hears of every finish (its own, and others' by notification):
            # watch before the runs can exist, so no news is missed.
            watch = self.waiters.watch(root)
        launch = functools.partial(
            self.store.launch,
            message=message,
            worker=self.worker_id,
            listen=self.listen,
            at=at,
            after=delay,
            allow_unhandled=allow_unhandled,
        )
        if connection is not None:
            launched = await launch(connection)
        else:
            async with self.database.connection() as conn:
                launched = await launch(conn)
        if launched is None:
            self.waiters.forget(root)
            raise await self._unhandled(resolved.name)
        found, sagas = launched
        if connection is None:
            if self._worker is not None and (at is not None or delay):
                due_in = delay or 0.0
                if at is not None:
                    due_in = (at - datetime.now(at.tzinfo)).total_seconds()
                self._worker.wake_in(max(0.0, due_in))
            for saga in sagas:
                self._wake(saga)
        if found != root or not sagas:
            # An existing hierarchy (its key was taken) or one with no runs: no news will come.
            self.waiters.forget(root)
            return RunHandle(self, found, resolved.name)
        return RunHandle(self, root, resolved.name, watch)

    async def _unhandled(self, topic: str) -> UnhandledTopicError:
        async with self.database.connection() as conn:
            topics = sorted({each for each, _ in await self.store.subscriptions(conn)})
        known = ", ".join(repr(t) for t in topics) or "none yet"
        return UnhandledTopicError(
            f"no saga subscribes to topic {topic!r}, so nothing would ever run it (topics "
            f"with subscribers: {known}). Start a worker that serves it first, or pass "
            "allow_unhandled=True"
        )

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
        async with self.database.connection() as conn, conn.transaction():
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
        async with self.database.connection() as conn:
            links = await self.store.schedule_links(conn, periodic.PERIODIC)
        return [periodic.SCHEDULES.decode(link) for link in links]

    async def unschedule(self, key: str, reason: str = "unscheduled") -> int:
        """Stop a schedule; return how many pending links of its chain were cancelled."""
        cancelled = 0
        while True:
            async with self.database.connection() as conn:
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

    def _on_committed(self, done: AfterCommit) -> None:
        for saga in done.ready_sagas:
            self._wake(saga)
        if done.wake_in is not None and self._worker is not None:
            self._worker.wake_in(done.wake_in)
        if done.root_done is not None:
            self.waiters.done(done.root_done)

    async def wait(self, root_id: uuid.UUID, timeout: float | None = None) -> Outcome:
        """Wait for a hierarchy's outcome (see `RunHandle.wait`)."""
        return await self._wait(root_id, timeout)

    async def _wait(
        self, root_id: uuid.UUID, timeout: float | None, watch: Watch | None = None
    ) -> Outcome:
        try:
            return await self.waiters.wait(root_id, self.outcome, timeout, watch)
        except TimeoutError as exc:
            try:
                waiting = await self.waiting_for(root_id)
            except (ScoopyError, LookupError):
                waiting = []
            still = "; ".join(str(each) for each in waiting) or "nothing it can name"
            raise WaitTimeout(
                f"hierarchy {root_id} did not finish within {timeout} s; it waits for: {still}"
            ) from exc

    async def waiting_for(self, root_id: uuid.UUID | str) -> list[Waiting]:
        """What each unfinished run of a hierarchy waits for now (empty once it finished)."""
        target = uuid.UUID(str(root_id))
        async with self.database.connection() as conn:
            root, _ = await control.locate(self.store, conn, target)
            rows = await self.topology_store.waits(conn, root, self.liveness_timeout)
        return waiting_for(rows)

    async def outcome(self, root_id: uuid.UUID) -> Outcome | None:
        """The hierarchy's outcome, or None while any of its root runs is unfinished.

        `root_id` may also be a run id: then it is that run's outcome.
        """
        async with self.database.connection() as conn:
            runs = await self.store.root_runs(conn, root_id)
            if not runs and not await self.store.message_exists(conn, root_id):
                run = await self.store.run_by_id(conn, root_id)
                if run is None:
                    raise LookupError(f"no message or run {root_id} in schema {self.schema!r}")
                runs = [run]
        return outcome_of(root_id, runs)

    # -- inspecting ------------------------------------------------------------------------

    async def events(self, root_id: uuid.UUID) -> list[Event]:
        """The hierarchy's event log, in order."""
        async with self.database.connection() as conn:
            return await self.store.events(conn, root_id)

    async def runs(self, root_id: uuid.UUID) -> list[RunInfo]:
        """Every run of a hierarchy, oldest first."""
        async with self.database.connection() as conn:
            return await self.store.runs_of(conn, root_id)

    # -- control ---------------------------------------------------------------------------

    async def cancel(self, run_id: uuid.UUID | str, reason: str, source: str = "operator") -> bool:
        """Ask a hierarchy (or the sub-tree under one run) to give up and roll back.

        Returns False if cancellation had already been requested for that target.
        """
        target = uuid.UUID(str(run_id))
        async with self.database.connection() as conn:
            inserted = await self.control.cancel(conn, target, reason, source)
        if self._worker is not None:
            self._worker.wake_all()
        return inserted

    async def move(self, run_id: uuid.UUID | str, to_step: str | None = None) -> None:
        """Let a held run go on under the saga's current definition.

        A run is held when a deploy changed its saga's steps at or before its position (see
        "Deploying changes" in the README). Moving it finds its steps in the new definition
        by name and goes on with the step that follows its position there, or with `to_step`.
        To roll it back instead, cancel it.
        """
        target = uuid.UUID(str(run_id))
        async with self.database.connection() as conn:
            saga = await self.control.move(conn, target, to_step)
        self._wake(saga)

    async def rollback(
        self, run_id: uuid.UUID | str, reason: str, source: str = "operator"
    ) -> RunHandle:
        """Undo a finished, committed hierarchy (or one committed run's sub-tree)."""
        target = uuid.UUID(str(run_id))
        async with self.database.connection() as conn:
            root_id, topic = await self.control.undo(conn, target, reason, source)
        if self._worker is not None:
            self._worker.wake_all()
        # Undoing a sub-tree is waited on by its run: the root itself stays committed.
        return RunHandle(self, root_id if target == root_id else target, topic)
