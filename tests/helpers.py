"""Shared test helpers (no fixed sleeps: everything waits on a condition)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from scoopy import Event, Message, Saga, Scope
from scoopy.saga import Step

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


def triples(
    events: Sequence[Event], *, sagas: Sequence[str] | None = None
) -> list[tuple[str, str | None, str | None]]:
    """(type, saga, step) of each event, optionally only for some sagas."""
    return [
        (e.type, e.saga, e.step)
        for e in events
        if sagas is None or e.saga in sagas or (e.saga is None and None in sagas)
    ]


def of_saga(events: Sequence[Event], saga: str) -> list[tuple[str, str | None]]:
    """(type, step) of the events one saga's runs wrote, in order."""
    return [(e.type, e.step) for e in events if e.saga == saga]


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


def logged(saga: Saga, name: str, log: list[str]) -> Step:
    """Add step `name` to `saga`: it appends `name` to `log`, its compensation "un" + name."""

    async def run(scope: Scope, message: Message[Any]) -> None:
        log.append(name)

    async def undo(scope: Scope, message: Message[Any], failure: BaseException) -> None:
        log.append("un" + name)

    step = saga.step(name)(run)
    step.rollback(undo)
    return step
