"""Knowing when hierarchies finish without asking the database in a loop.

The engine notifies `d:<root id>` on its schema's channel in the transaction that
finishes a hierarchy, so the notification arrives after that commit. A watcher on its
own connection counts them: no query competes with the workload being timed. The
database stays the judge: every workload verifies the final states with one query after
the clock has stopped.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any

import anyio

from .pg import Conn, connect


class ChannelWatch:
    def __init__(self, dsn: str, channel: str) -> None:
        self.dsn = dsn
        self.channel = channel
        self.counts: Counter[str] = Counter()
        self._pending: set[uuid.UUID] = set()
        self._last_done = 0.0
        self._all_done = anyio.Event()
        self._changed = anyio.Event()
        self._conn: Conn | None = None

    async def __aenter__(self) -> ChannelWatch:
        self._conn = await connect(self.dsn)
        await self._conn.add_listener(self.channel, self._on_notify)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._conn is not None:
            with anyio.CancelScope(shield=True):
                await self._conn.close()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        if not isinstance(payload, str):
            return
        self.counts[payload] += 1
        if payload.startswith("d:") and self._pending:
            root = uuid.UUID(payload[2:])
            if root in self._pending:
                self._pending.discard(root)
                self._last_done = time.perf_counter()
                if not self._pending:
                    self._all_done.set()
        self._changed.set()
        self._changed = anyio.Event()

    def expect(self, roots: Iterable[uuid.UUID]) -> None:
        """Start waiting for these hierarchies (register them before they can finish)."""
        self._pending = set(roots)
        self._all_done = anyio.Event()
        if not self._pending:
            self._all_done.set()

    async def all_done(self, timeout: float) -> float:
        """Wait for every expected hierarchy; return when (perf_counter) the last finished."""
        with anyio.fail_after(timeout):
            await self._all_done.wait()
        return self._last_done

    async def until(
        self,
        ready: Callable[[], bool],
        verify: Callable[[], Awaitable[bool]],
        timeout: float,
        recheck: float = 1.0,
    ) -> None:
        """Wait until `verify()` (a query) holds; ask it when the notifications counted so far
        make `ready()` true, or when `recheck` seconds passed without any notification."""
        stale = False
        with anyio.fail_after(timeout):
            while True:
                if (ready() or stale) and await verify():
                    return
                changed = self._changed
                stale = True
                with anyio.move_on_after(recheck):
                    await changed.wait()
                    stale = False
