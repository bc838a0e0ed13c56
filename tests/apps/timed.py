"""Sagas served by worker processes in tests/test_sleep.py and tests/test_schedules.py.

Started as `python -m scoopy --dsn DSN --schema S worker tests.apps.timed:setup`; the test
creates the business tables (`steps`, `fired`) in schema `$SCOOPY_TEST_SCHEMA` first.
"""

from __future__ import annotations

import os
from typing import Any

from scoopy import Cooperation, Message, Saga, Scope


def _table(name: str) -> str:
    return f'"{os.environ["SCOOPY_TEST_SCHEMA"]}".{name}'


# -- a run that sleeps between its two steps ------------------------------------------------

nap = Saga("nap", instances=1)


async def _record(scope: Scope, label: str) -> None:
    # UNIQUE (run_id, step): a second commit of the same step would fail loudly.
    await scope.connection.execute(
        f"INSERT INTO {_table('steps')} (run_id, step, pid, at) VALUES ($1, $2, $3, $4)",
        scope.run_id,
        label,
        os.getpid(),
        scope.now(),
    )


@nap.step()
async def doze(scope: Scope, message: Message[Any]) -> None:
    await _record(scope, "doze")
    await scope.sleep(float(message.payload["seconds"]))
    # Delivered when this step commits, i.e. once the run is durably asleep.
    await scope.connection.execute(
        "SELECT pg_notify($1, $2)", f"{os.environ['SCOOPY_TEST_SCHEMA']}_asleep", str(scope.run_id)
    )


@nap.step()
async def wake(scope: Scope, message: Message[Any]) -> None:
    await _record(scope, "wake")


# -- a job launched for later ---------------------------------------------------------------

once = Saga("once")


@once.step()
async def fire(scope: Scope, message: Message[Any]) -> None:
    # UNIQUE (message_id): the job of one message can commit only once.
    await scope.connection.execute(
        f"INSERT INTO {_table('fired')} (message_id, label, pid, at) VALUES ($1, $2, $3, $4)",
        message.id,
        message.payload["label"],
        os.getpid(),
        scope.now(),
    )


def setup(coop: Cooperation) -> None:
    coop.subscribe("nap", nap)
    coop.subscribe("scheduled", once)
