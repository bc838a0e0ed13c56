"""Issue 11, defect 2: a launch nobody handles must not report success.

Today `coop.launch` / `scoopy launch --wait` to a topic with no subscriber ends `committed`
with zero runs: the work silently never happens, and the same when the launch comes before
the workers have registered their subscriptions.

The behaviour these tests ask for (recommended in the report): a *root* launch (API or CLI)
onto a topic that has no subscription in the shared registry at the moment of the launch is
refused with a `ScoopyError` naming the topic, and nothing is written. Runs are created
when the message is written (fan-out on write), so "nobody subscribes now" means "nobody
will ever run this message": the caller must hear it then, not from an `Outcome` later. A
launcher that starts before its workers gets the error and retries; its own in-process
subscriptions count (they are written before a launch). A message launched *inside* a step
onto a topic nobody listens to stays allowed (it blocks nobody, as the README says).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import anyio
import asyncpg
import pytest

from scoopy import Cooperation, Message, Saga, ScoopyError, Scope

from .helpers import ROOT, WAIT, WorkerProcess

MakeCoop = Callable[..., Cooperation]
Db: TypeAlias = "asyncpg.Connection[asyncpg.Record]"

NOBODY = r"'nobody'.*subscri|subscri.*'nobody'"


async def messages(db: Db) -> int:
    return int(await db.fetchval("SELECT count(*) FROM message"))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"key": "once"},
        {"after": 30.0},
        {"at": datetime.now(UTC) + timedelta(hours=1)},
    ],
    ids=["plain", "key", "after", "at"],
)
async def test_a_launch_to_a_topic_nobody_subscribes_is_refused(
    make_coop: MakeCoop, db: Db, options: dict[str, Any]
) -> None:
    async with make_coop(worker=False) as coop:
        with pytest.raises(ScoopyError, match=NOBODY):
            await coop.launch("nobody", {"id": 7}, **options)
        assert await messages(db) == 0


async def test_a_transactional_launch_to_a_topic_nobody_subscribes_is_refused(
    make_coop: MakeCoop, db: Db
) -> None:
    async with make_coop(worker=False) as coop, coop.pool.acquire() as conn:
        with pytest.raises(ScoopyError, match=NOBODY):
            async with conn.transaction():
                await coop.launch("nobody", {}, connection=conn)
        assert await messages(db) == 0


async def test_the_cli_launch_to_a_topic_nobody_subscribes_fails(dsn: str, schema: str) -> None:
    result = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "scoopy", "--dsn", dsn, "--schema", schema,
             "launch", "nobody", "{}", "--wait", "--timeout", "10"],
            capture_output=True, text=True, cwd=ROOT, timeout=WAIT, check=False,
        )
    )  # fmt: skip
    assert result.returncode == 2, result.stdout
    assert "committed" not in result.stdout
    assert "scoopy: error:" in result.stderr and "'nobody'" in result.stderr


async def test_a_launch_before_the_workers_registered_is_refused_then_works(
    dsn: str, schema: str, make_coop: MakeCoop, db: Db
) -> None:
    """The registry is shared: "nobody" is judged at the launch, by what any service has
    registered. Before the worker process registered `work`, the launch is refused; once it
    has, the same launch runs."""
    await db.execute("CREATE TABLE work (run_id uuid, step text, pid int, UNIQUE (run_id, step))")
    await db.execute("CREATE TABLE arrivals (pid int)")
    async with make_coop(worker=False) as coop:
        with pytest.raises(ScoopyError, match=r"'work'.*subscri|subscri.*'work'"):
            await coop.launch("work", {})
        assert await messages(db) == 0
        async with WorkerProcess(dsn, schema, "tests.apps.workers:setup"):
            outcome = await (await coop.launch("work", {})).wait(timeout=WAIT)
    assert outcome.status == "committed"
    assert [run.saga for run in outcome.runs] == ["work"]


async def test_a_step_may_still_emit_to_a_topic_nobody_listens_to(make_coop: MakeCoop) -> None:
    """Not part of the defect, a guard for its fix: inside a hierarchy a message nobody
    listens to blocks nobody (events for optional listeners)."""
    saga = Saga("announcer")

    @saga.step()
    async def announce(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("nobody", {})

    async with make_coop() as coop:
        coop.subscribe("announce", saga)
        outcome = await (await coop.launch("announce", {})).wait(timeout=WAIT)
    assert outcome.status == "committed"
    assert [run.saga for run in outcome.runs] == ["announcer"]
