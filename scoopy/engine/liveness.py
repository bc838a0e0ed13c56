"""Live topology: every worker says it is alive, and looks after what no worker can do.

Each worker's task group runs one `Liveness` task. Every `interval` seconds it
- writes its heartbeat: which sagas it serves, under which definition, and the prefixes of
  the runs that definition may advance (see `engine/definition.py`);
- holds the ready runs of its sagas that no live worker's definition fits (after a deploy
  that changed their steps at or before their position), with the reason, visibly;
- releases the held runs its own definition fits (an old release came back, or an alias
  was declared);
- warns, once per episode, about sagas with work waiting that no live worker serves;
- removes subscriptions whose saga no live worker has served for `ttl` seconds (a saga
  that was renamed, or an app that ran once against the schema), as `unsubscribe` does.
A worker that stops says so; one that dies is presumed dead after `timeout` seconds.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping

import anyio
import msgspec
import structlog

from ..failure import CooperationFailure
from ..vocab import Connection
from .database import Database
from .definition import Definition
from .faults import connection_lost
from .machine import RunState
from .records import Binding, UnfitRun
from .store import Store
from .topology import KnownDefinitions, TopologyStore

log = structlog.get_logger("scoopy")

HELD = "scoopy.DefinitionChanged"
_state = msgspec.json.Decoder(RunState)


class Liveness:
    """The heartbeat and housekeeping task of one worker."""

    def __init__(
        self,
        store: Store,
        topology: TopologyStore,
        database: Database,
        worker: str,
        served: Mapping[str, Binding],
        definitions: KnownDefinitions,
        *,
        listen: bool,
        interval: float,
        timeout: float,
        ttl: float | None,
        on_ready: Callable[[str], None],
    ) -> None:
        self.store = store
        self.topology = topology
        self.database = database
        self.worker = worker
        self.served = served
        self.definitions = definitions
        self.listen = listen
        self.interval = interval
        self.timeout = timeout
        self.ttl = ttl
        self.on_ready = on_ready
        self._unserved: set[str] = set()  # sagas already warned about

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.beat()
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:
                if connection_lost(exc):
                    self.database.outage.lost("heartbeat", exc)
                else:
                    log.warning("heartbeat failed; retrying", error=repr(exc))
            await anyio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def stop(self) -> None:
        """Say this worker stopped, so nobody waits `timeout` to learn it (best effort)."""
        with anyio.move_on_after(2), anyio.CancelScope(shield=True):
            try:
                async with self.database.pool.acquire() as conn:
                    await self.topology.worker_stopped(conn, self.worker)
            except Exception as exc:
                log.debug("could not record the worker's stop", error=repr(exc))

    async def beat(self) -> None:
        bindings = dict(self.served)
        serves = {
            name: {
                "definition": b.definition.fingerprint,
                "version": b.saga.version,
                "accepted": b.accepted,
                "limits": {
                    "concurrency": b.saga.concurrency,
                    "rate": None if b.saga.rate is None else [b.saga.rate.starts, b.saga.rate.per],
                },
            }
            for name, b in bindings.items()
        }
        async with self.database.pool.acquire() as conn:
            await self.topology.heartbeat(
                conn, self.worker, socket.gethostname(), os.getpid(), serves
            )
            newest = await self.topology.newest_versions(conn, list(bindings), self.timeout)
            for name, binding in bindings.items():
                starts_new = binding.saga.version >= newest.get(name, 0)
                if starts_new != binding.starts_new:
                    binding.starts_new = starts_new
                    log.info(
                        "starting new runs" if starts_new else "starting no new runs",
                        saga=name,
                        version=binding.saga.version,
                        newest_live_version=newest.get(name, 0),
                    )
            await self.release(conn, bindings)
            await self.hold(conn, bindings)
            await self.warn_unserved(conn)
            await self.expire(conn)
            await self.topology.forget_workers(conn, max(3600.0, self.timeout * 10))

    async def release(self, conn: Connection, bindings: Mapping[str, Binding]) -> None:
        fits = [(name, prefix) for name, b in bindings.items() for prefix in b.accepted]
        if not fits:
            return
        for saga in set(await self.topology.release(conn, fits, self.worker)):
            log.warning("held runs released: this worker's definition fits them", saga=saga)
            self.on_ready(saga)

    async def hold(self, conn: Connection, bindings: Mapping[str, Binding]) -> None:
        if not bindings:
            return
        async with conn.transaction():
            runs = await self.topology.unfit(conn, list(bindings), self.timeout, self.interval * 2)
            if not runs:
                return
            reasons = [await self._reason(conn, bindings[run.saga].definition, run) for run in runs]
            await hold(self.topology, conn, [run.id for run in runs], reasons, self.worker)
        for run, reason in zip(runs, reasons, strict=True):
            log.warning("run held", saga=run.saga, run_id=str(run.id), reason=reason)

    async def _reason(self, conn: Connection, mine: Definition, run: UnfitRun) -> str:
        state = _state.decode(run.state)
        reached = max(state.reached, state.last or 0)
        fingerprint = str(run.definition)
        old = await self.definitions.get(conn, run.saga, fingerprint)
        if old is None:
            return (
                f"saga {run.saga!r}: run {run.id} started under definition {fingerprint}, "
                "which no worker registered"
            )
        step = old.steps[min(reached, len(old.steps) - 1)].name
        return (
            f"saga {run.saga!r}: run {run.id} reached step {step!r} under a definition no live "
            f"worker runs: {mine.difference(old, reached)} (its steps: {', '.join(old.names())};"
            f" now: {', '.join(mine.names())}). Deploy a worker with its steps, declare the "
            "change (step aliases), or move or roll back the run"
        )

    async def warn_unserved(self, conn: Connection) -> None:
        unserved = await self.topology.unserved(conn, self.interval, self.timeout)
        for saga, last_served in unserved:
            if saga not in self._unserved:
                log.warning(
                    "runs wait for a saga no live worker serves",
                    saga=saga,
                    last_served=last_served.isoformat(),
                )
        self._unserved = {saga for saga, _ in unserved}

    async def expire(self, conn: Connection) -> None:
        if self.ttl is None:
            return
        for topic, saga in await self.topology.expired(conn, self.ttl, self.timeout):
            async with conn.transaction():
                skipped, ready = await self.store.unsubscribe(conn, topic, saga, self.listen)
            log.warning(
                "subscription expired: no live worker served its saga",
                topic=topic,
                saga=saga,
                after_s=self.ttl,
                skipped_runs=skipped,
            )
            for each in ready:
                self.on_ready(each)


async def hold(
    store: TopologyStore, conn: Connection, runs: list[uuid.UUID], reasons: list[str], worker: str
) -> None:
    """Take `runs` out of the ready index, each with the reason no worker can advance it."""
    failures = [
        CooperationFailure(type=HELD, message=reason, source=worker).to_json().decode()
        for reason in reasons
    ]
    await store.hold(conn, runs, reasons, failures, worker)
