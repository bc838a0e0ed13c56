"""A saga whose compensation can hang, served by worker processes in the SIGKILL test.

Started as `python -m scoopy --dsn DSN --schema S worker tests.apps.compensations:setup`.
With `HANG_IN_COMPENSATION=1` the compensation writes its business row, tells the test
(NOTIFY on a connection of its own, so the signal survives the kill) and never finishes.
"""

from __future__ import annotations

import os
from typing import Any

import anyio
import asyncpg

from scoopy import Cooperation, Message, Saga, Scope

booking = Saga("booking", instances=1)


class CardDeclined(Exception):
    """The business failure that makes the booking roll back."""


def _schema() -> str:
    return os.environ["SCOOPY_TEST_SCHEMA"]


async def _record(scope: Scope, what: str) -> None:
    await scope.connection.execute(
        f'INSERT INTO "{_schema()}".ledger (run_id, what, pid) VALUES ($1, $2, $3)',
        scope.run_id,
        what,
        os.getpid(),
    )


@booking.step()
async def reserve(scope: Scope, message: Message[Any]) -> None:
    await _record(scope, "reserved")


@reserve.rollback
async def release(scope: Scope, message: Message[Any], failure: BaseException) -> None:
    await _record(scope, "released")
    if os.environ.get("HANG_IN_COMPENSATION"):
        conn = await asyncpg.connect(os.environ["SCOOPY_DSN"])
        try:
            await conn.execute(
                "SELECT pg_notify($1, $2)", f"{_schema()}_compensating", str(os.getpid())
            )
        finally:
            await conn.close()
        await anyio.sleep_forever()


@booking.step()
async def charge(scope: Scope, message: Message[Any]) -> None:
    raise CardDeclined("card declined")


def setup(coop: Cooperation) -> None:
    coop.subscribe("bookings", booking)
