"""A step with a retry policy, served by worker processes in tests/test_retries.py.

Started as `python -m scoopy --dsn DSN --schema S worker tests.apps.retrying:setup`; the test
creates the business table `attempts` in schema `$SCOOPY_TEST_SCHEMA` first. Every attempt
is recorded on a connection of its own (a failed attempt's transaction leaves nothing), and
the first attempt fails.
"""

from __future__ import annotations

import os
from typing import Any

import asyncpg

from scoopy import Cooperation, Message, RetryPolicy, Saga, Scope

BACKOFF = 2.0  # seconds between the failed first attempt and the second

sync = Saga("sync", instances=1)


class PartnerTimeout(Exception):
    """The failure worth retrying."""


@sync.step(retry=RetryPolicy(attempts=3, backoff=BACKOFF, jitter=0, on=(PartnerTimeout,)))
async def call_partner(scope: Scope, message: Message[Any]) -> None:
    conn = await asyncpg.connect(os.environ["SCOOPY_DSN"])
    try:
        await conn.execute(
            f'INSERT INTO "{os.environ["SCOOPY_TEST_SCHEMA"]}".attempts (run_id, attempt, pid, at)'
            " VALUES ($1, $2, $3, clock_timestamp())",
            scope.run_id,
            scope.attempt,
            os.getpid(),
        )
    finally:
        await conn.close()
    if scope.attempt == 1:
        raise PartnerTimeout("partner API timed out")


def setup(coop: Cooperation) -> None:
    coop.subscribe("sync", sync)
