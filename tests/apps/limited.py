"""Sagas under cluster-wide limits, served by several worker processes (tests/test_limits.py).

`python -m scoopy worker tests.apps.limited:setup` serves `slow` (at most 2 steps at once
anywhere, compensations included) and `paced` (at most 20 step starts a second).
"""

from __future__ import annotations

import os
from typing import Any

import anyio

from scoopy import Cooperation, Message, Rate, Saga, Scope

WORK = 0.05  # how long a step of `slow` holds its slot: long enough for others to overlap


def _table() -> str:
    return f'"{os.environ["SCOOPY_TEST_SCHEMA"]}".span'


async def span(scope: Scope, kind: str) -> None:
    """Record when this step (or compensation) ran, from inside its transaction."""
    started = await scope.connection.fetchval("SELECT clock_timestamp()")
    await anyio.sleep(WORK)
    await scope.connection.execute(
        f"INSERT INTO {_table()} (saga, kind, started, ended, pid) "
        "VALUES ($1, $2, $3, clock_timestamp(), $4)",
        scope.saga,
        kind,
        started,
        os.getpid(),
    )


# One step at a time per process: three processes could run three at once, the limit is two,
# and no single process can take both slots, so the test sees processes share them.
slow = Saga("slow", concurrency=2, instances=1)


@slow.step()
async def hold_a_slot(scope: Scope, message: Message[Any]) -> None:
    await span(scope, "step")


@hold_a_slot.rollback
async def give_back(scope: Scope, message: Message[Any], failure: BaseException) -> None:
    await span(scope, "compensation")


@slow.step()
async def maybe_fail(scope: Scope, message: Message[Any]) -> None:
    if message.payload.get("fail"):
        raise RuntimeError("fail on purpose: the compensation must respect the limit too")


paced = Saga("paced", rate=Rate(20, per=1.0), instances=4)


@paced.step()
async def start(scope: Scope, message: Message[Any]) -> None:
    await scope.connection.execute(
        f"INSERT INTO {_table()} (saga, kind, started, ended, pid) "
        "VALUES ($1, 'step', clock_timestamp(), clock_timestamp(), $2)",
        scope.saga,
        os.getpid(),
    )


def setup(coop: Cooperation) -> None:
    coop.subscribe("slow", slow)
    coop.subscribe("paced", paced)
