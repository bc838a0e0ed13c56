"""Which sagas this process serves on which topics, and writing that to the shared registry.

`subscribe`/`unsubscribe` are synchronous calls an app makes while it sets itself up (and
may make later): they change this process's bindings at once and queue the change for the
`subscription` table, which a background task writes right away. A launch first waits for
queued changes, so that it fans out to the registry this process has asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import anyio
import structlog

from ..errors import SagaDefinitionError
from ..message import Topic
from ..saga import Saga
from .database import Database
from .definition import encode_steps
from .faults import connection_lost
from .records import Binding
from .store import Store
from .topology import TopologyStore

log = structlog.get_logger("scoopy")


class Registry:
    """This process's subscriptions, kept in step with the `subscription` table."""

    def __init__(
        self,
        store: Store,
        topology: TopologyStore,
        database: Database,
        *,
        listen: bool,
        on_ready: Callable[[str], None],
        on_done: Callable[[], None],
    ) -> None:
        self.store = store
        self.topology = topology
        self.database = database
        self.listen = listen
        self.on_ready = on_ready  # a saga whose runs an unsubscribe made ready
        self.on_done = on_done  # an unsubscribe may have finished hierarchies
        self.bindings: dict[str, Binding] = {}
        self._unsynced: list[tuple[Literal["+", "-"], str, str]] = []
        self._lock = anyio.Lock()
        self._wanted: anyio.Event | None = None

    def add(self, topic: Topic[Any], saga: Saga) -> Binding:
        binding = self.bindings.get(saga.name)
        if binding is None:
            binding = self.bindings[saga.name] = Binding(saga)
        elif binding.saga is not saga:
            raise SagaDefinitionError(
                f"another saga named {saga.name!r} is already subscribed here"
            )
        binding.topics[topic.name] = topic
        self._queue("+", topic.name, saga.name)
        return binding

    def remove(self, topic: str, saga: str) -> None:
        binding = self.bindings.get(saga)
        if binding is not None:
            binding.topics.pop(topic, None)
        self._queue("-", topic, saga)

    def known_topic(self, name: str) -> Topic[Any] | None:
        """The `Topic` object some served saga subscribed under `name`, if any."""
        for binding in self.bindings.values():
            known = binding.topics.get(name)
            if known is not None:
                return known
        return None

    def _queue(self, sign: Literal["+", "-"], topic: str, saga: str) -> None:
        self._unsynced.append((sign, topic, saga))
        if self._wanted is not None:
            self._wanted.set()

    async def sync(self) -> None:
        """Write the queued changes now (and wait for a write in flight)."""
        if not self._unsynced and not self._lock.locked():
            return  # (a sync in flight may still be writing what a launch must see)
        async with self._lock:
            changes, self._unsynced = self._unsynced, []
            if not changes:
                return
            ready: list[str] = []
            try:
                async with self.database.connection() as conn, conn.transaction():
                    added = {saga for sign, _, saga in changes if sign == "+"}
                    definitions = [
                        self.bindings[saga].definition for saga in added & set(self.bindings)
                    ]
                    if definitions:
                        await self.topology.register_definitions(
                            conn, [(d.saga, d.fingerprint, encode_steps(d)) for d in definitions]
                        )
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
                self.on_ready(saga)
            self.on_done()  # skipped root runs may have finished a hierarchy

    async def run(self) -> None:
        """Write changes made after start in the background, right away."""
        self._wanted = anyio.Event()
        if self._unsynced:
            self._wanted.set()
        while True:
            await self._wanted.wait()
            self._wanted = anyio.Event()
            try:
                await self.sync()
            except Exception as exc:
                if connection_lost(exc):
                    self.database.outage.lost("subscriptions", exc)
                else:
                    log.warning("could not write subscriptions; retrying", error=repr(exc))
                await anyio.sleep(1.0)
                self._wanted.set()
