"""Shared test helpers (no fixed sleeps: everything waits on a condition)."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import asyncpg
import pytest

from scoopy import Cooperation, CooperationFailure, Event, Message, Saga, Scope
from scoopy.saga import Step

MakeCoop = Callable[..., Cooperation]  # the `make_coop` fixture

# Tests of the engine's semantics run twice: with LISTEN/NOTIFY and in poll-only mode.
both_modes = pytest.mark.parametrize("listen", [True, False], ids=["listen", "poll"])

WAIT = 30.0  # generous upper bound for a hierarchy to finish on a loaded CI machine
RECHECK = 0.02  # how often `eventually` re-asks a condition nothing notifies us of


class MyException(Exception):
    """A business failure raised by a step."""


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


def add_step(
    saga: Saga,
    name: str,
    log: list[str] | None = None,
    *,
    does: str | None = None,
    launches: str | None = None,
    sleeps: float | None = None,
    raises: Exception | None = None,
    undo: str | None = None,
    undo_raises: Exception | None = None,
) -> Step:
    """Add step `name` to `saga`. It does, in this order: append `does` to `log`, launch `{}`
    onto the topic `launches`, sleep `sleeps` seconds (durably), raise `raises`.

    It has a compensation only if `undo` or `undo_raises` is given: that appends `undo` to
    `log`, then raises `undo_raises`. Every raise raises a fresh copy of the example given.
    """

    def note(entry: str | None) -> None:
        if entry is not None:
            assert log is not None, "a step that logs needs the log"
            log.append(entry)

    async def run(scope: Scope, message: Message[Any]) -> None:
        note(does)
        if launches is not None:
            await scope.launch(launches, {})
        if sleeps is not None:
            await scope.sleep(sleeps)
        if raises is not None:
            raise type(raises)(*raises.args)

    async def compensate(scope: Scope, message: Message[Any], failure: BaseException) -> None:
        note(undo)
        if undo_raises is not None:
            raise type(undo_raises)(*undo_raises.args)

    step = saga.step(name)(run)
    if undo is not None or undo_raises is not None:
        step.rollback(compensate)
    return step


def logged(saga: Saga, name: str, log: list[str]) -> Step:
    """Add step `name` to `saga`: it appends `name` to `log`, its compensation "un" + name."""
    return add_step(saga, name, log, does=name, undo="un" + name)


# -- reading what a hierarchy did ---------------------------------------------------------


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


def describe(failure: CooperationFailure | None) -> str | None:
    """A failure tree in the notation of seed 003: `ChildRolledBack(RuntimeError("Geronimo!"))`.

    Leaves show their message; wrappers show their causes.
    """
    if failure is None:
        return None
    name = failure.type.rsplit(".", 1)[-1]
    if failure.causes:
        return f"{name}({', '.join(str(describe(cause)) for cause in failure.causes)})"
    return f'{name}("{failure.message}")'


def failure_types(failure: CooperationFailure | None) -> list[str]:
    """Every failure type in a failure's cause tree, depth first."""
    assert failure is not None
    return [f.type for f in failure.walk()]


def find(failure: CooperationFailure | None, type_: str) -> CooperationFailure:
    """The one failure of `type_` in a failure's cause tree."""
    assert failure is not None
    (found,) = [f for f in failure.walk() if f.type == type_]
    return found


def run_of(events: Sequence[Event], saga: str) -> uuid.UUID:
    """The run id of the (single) run of `saga` in the log."""
    found = {e.run_id for e in events if e.saga == saga and e.type == "SEEN"}
    assert len(found) == 1, found
    run = found.pop()
    assert run is not None
    return run


def failure_of(events: Sequence[Event], saga: str, kind: str) -> CooperationFailure:
    """The failure on the single event of type `kind` written by `saga`."""
    [failure] = [e.failure for e in events if e.saga == saga and e.type == kind]
    assert failure is not None
    return failure


def labelled(
    events: Sequence[Event], root_id: uuid.UUID
) -> list[tuple[str, str, str | None, str | None, str | None]]:
    """Rows shaped like the seed-003 tables: (message, type, saga, step, failure).

    Messages are labelled "root", then "child-1", "child-2"... in the order they were emitted.
    """
    labels = {root_id: "root"}
    for event in events:
        if event.type == "EMITTED" and event.message_id not in labels:
            assert event.message_id is not None
            labels[event.message_id] = f"child-{len(labels)}"
    rows = []
    for event in events:
        assert event.message_id is not None
        rows.append(
            (labels[event.message_id], event.type, event.saga, event.step, describe(event.failure))
        )
    return rows


def has(events: Sequence[Event], type_: str, saga: str, step: str | None = None) -> bool:
    """Whether `saga` wrote an event of type `type_` (at step `step`, if given)."""
    return any(
        e.type == type_ and e.saga == saga and (step is None or e.step == step) for e in events
    )


async def db_now(db: asyncpg.Connection[asyncpg.Record]) -> datetime:
    """The database clock (the clock scoopy's timers use)."""
    now: datetime = await db.fetchval("SELECT clock_timestamp()")
    return now
