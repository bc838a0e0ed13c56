"""Sagas served by separate worker processes in the multi-process tests.

Started as `python -m scoopy --dsn DSN --schema S worker tests.apps.workers:setup`.
"""

from __future__ import annotations

import os
from typing import Any

import anyio
import asyncpg

from scoopy import Cooperation, Message, Saga, Scope

work = Saga("work", instances=1)


def _schema() -> str:
    return os.environ["SCOOPY_TEST_SCHEMA"]


async def _record(scope: Scope) -> None:
    await scope.connection.execute(
        f'INSERT INTO "{_schema()}".work (run_id, step, pid) VALUES ($1, $2, $3)',
        scope.run_id,
        scope.step,
        os.getpid(),
    )


async def _both_workers_arrived() -> None:
    """Block until two different worker processes have run a step (a cross-process barrier)."""
    conn = await asyncpg.connect(os.environ["SCOOPY_DSN"])
    arrived = anyio.Event()
    channel = f"{_schema()}_arrivals"

    def wake() -> None:
        arrived.set()

    try:
        await conn.add_listener(channel, lambda *_: wake())
        await conn.execute(f'INSERT INTO "{_schema()}".arrivals VALUES ($1)', os.getpid())
        await conn.execute("SELECT pg_notify($1, '')", channel)
        while True:
            count = await conn.fetchval(f'SELECT count(DISTINCT pid) FROM "{_schema()}".arrivals')
            if count >= 2:
                return
            with anyio.move_on_after(1):
                await arrived.wait()
            arrived = anyio.Event()
    finally:
        await conn.close()


@work.step()
async def first(scope: Scope, message: Message[Any]) -> None:
    if os.environ.get("BARRIER"):
        await _both_workers_arrived()
    await _record(scope)


@work.step()
async def second(scope: Scope, message: Message[Any]) -> None:
    await _record(scope)
    if os.environ.get("HANG_IN") == "second":
        # Tell the test we are inside the step, then never finish: the test kills us.
        conn = await asyncpg.connect(os.environ["SCOOPY_DSN"])
        await conn.execute("SELECT pg_notify($1, $2)", f"{_schema()}_hang", str(os.getpid()))
        await conn.close()
        await anyio.sleep_forever()


def setup(coop: Cooperation) -> None:
    coop.subscribe("work", work)


def subscribes_nothing(coop: Cooperation) -> None:
    """A setup function that forgot to subscribe anything."""
