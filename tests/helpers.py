"""Shared test helpers (no fixed sleeps: everything waits on a condition)."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import asyncpg
import pytest

from scoopy import Cooperation, Event, Outcome, RunHandle, Saga

MakeCoop = Callable[..., Cooperation]  # the `make_coop` fixture

# Tests of the engine's semantics run twice: with LISTEN/NOTIFY and in poll-only mode.
both_modes = pytest.mark.parametrize("listen", [True, False], ids=["listen", "poll"])

WAIT = 30.0  # generous upper bound for a hierarchy to finish on a loaded CI machine
RECHECK = 0.02  # how often `eventually` re-asks a condition nothing notifies us of


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = WAIT) -> None:
    """Wait until `check()` holds (TimeoutError after `timeout`): a condition, not a sleep."""
    with anyio.fail_after(timeout):
        while True:  # the database notifies nobody of these conditions: re-ask
            if await check():
                return
            await anyio.sleep(RECHECK)


async def run_to_end(
    coop: Cooperation, sagas: Iterable[tuple[str, Saga]], topic: str, **launch: Any
) -> tuple[RunHandle, Outcome, list[Event]]:
    """Start `coop` serving each (topic, saga) of `sagas`, launch `{}` onto `topic` (with the
    options in `launch`) and wait for the hierarchy: its handle, outcome and event log."""
    async with coop:
        for served, saga in sagas:
            coop.subscribe(served, saga)
        handle = await coop.launch(topic, {}, **launch)
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)
    return handle, outcome, events


ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """A `scoopy worker` subprocess; entering waits until it reports it has started."""

    def __init__(self, dsn: str, schema: str, app: str, **env: str) -> None:
        self.args = [
            sys.executable, "-m", "scoopy", "--dsn", dsn, "--schema", schema,
            "--log-level", "info", "worker", app,
        ]  # fmt: skip
        self.env = {**os.environ, "SCOOPY_DSN": dsn, "SCOOPY_TEST_SCHEMA": schema, **env}
        self.output = bytearray()
        self._changed = anyio.Event()
        self._eof = False
        self.process: anyio.abc.Process | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def __aenter__(self) -> WorkerProcess:
        self.process = await anyio.open_process(self.args, env=self.env, cwd=ROOT)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._drain)
        await self.wait_for(b"worker started")
        return self

    async def wait_for(self, needle: bytes) -> None:
        """Wait until the worker's log output contains `needle`."""
        with anyio.fail_after(WAIT):
            while needle not in self.output:
                if self._eof:
                    raise RuntimeError(f"worker exited: {self.output.decode(errors='replace')}")
                changed = self._changed
                await changed.wait()

    async def _drain(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.output += chunk
            self._changed.set()
            self._changed = anyio.Event()
        self._eof = True
        self._changed.set()

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def __aexit__(self, *exc: object) -> None:
        assert self.process is not None and self._tg is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(WAIT):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        await self._tg.__aexit__(None, None, None)


async def wait_for_event(
    coop: Cooperation, root_id: uuid.UUID, match: Callable[[Event], bool]
) -> Event:
    """Wait until the hierarchy's event log holds a matching event, and return it."""
    found: list[Event] = []

    async def seen() -> bool:
        found[:] = [event for event in await coop.events(root_id) if match(event)]
        return bool(found)

    await eventually(seen)
    return found[0]


async def db_now(db: asyncpg.Connection[asyncpg.Record]) -> datetime:
    """The database clock (the clock scoopy's timers use)."""
    now: datetime = await db.fetchval("SELECT clock_timestamp()")
    return now
