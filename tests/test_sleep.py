"""Durable sleep: `scope.sleep` holds the next step back on the database clock, survives a
worker restart, and a far timer does not stop a poll-only worker from polling.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

import anyio
import asyncpg
import pytest

from scoopy import Message, Saga, Scope

from .apps.steps import add_step
from .helpers import WAIT, MakeCoop, WorkerProcess, both_modes, db_now
from .reading import of_saga

APP = "tests.apps.timed:setup"


@both_modes
async def test_durable_sleep_delays_the_next_step(make_coop: MakeCoop, listen: bool) -> None:
    """`scope.sleep` and the `saga.sleep` step form hold the next step back by at least their
    duration on the database clock; the log shows one suspension per step and nothing else."""
    at: dict[str, datetime] = {}
    napper = Saga("napper")

    @napper.step()
    async def doze(scope: Scope, message: Message[Any]) -> None:
        at["doze"] = scope.now()
        await scope.sleep(0.5)

    napper.sleep(timedelta(seconds=0.3), "nap")

    @napper.step()
    async def wake(scope: Scope, message: Message[Any]) -> None:
        at["wake"] = scope.now()

    async with make_coop(listen=listen) as coop:
        coop.subscribe("napping", napper)
        started = time.monotonic()
        handle = await coop.launch("napping", {})
        outcome = await handle.wait(timeout=WAIT)
        elapsed = time.monotonic() - started
        events = await coop.events(handle.id)

    assert outcome.status == "committed", outcome.failure
    assert elapsed >= 0.8
    assert at["wake"] - at["doze"] >= timedelta(seconds=0.8)
    assert of_saga(events, "napper") == [
        ("SEEN", None),
        ("SUSPENDED", "doze"),
        ("SUSPENDED", "nap"),
        ("SUSPENDED", "wake"),
        ("COMMITTED", "wake"),
    ]
    suspended = {e.step: e.time for e in events if e.type == "SUSPENDED"}
    # Each SUSPENDED is written a few ms after its step read the clock, hence the slack.
    assert suspended["nap"] - suspended["doze"] >= timedelta(seconds=0.45)
    assert suspended["wake"] - suspended["nap"] >= timedelta(seconds=0.25)


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_a_sleeping_run_survives_a_worker_restart(
    dsn: str,
    schema: str,
    make_coop: MakeCoop,
    db: asyncpg.Connection[asyncpg.Record],
    stop: str,
) -> None:
    """A run asleep when its worker process stops is finished by a new worker, not before its
    wake time, and each of its steps commits exactly once."""
    await db.execute(
        "CREATE TABLE steps (run_id uuid, step text, pid int, at timestamptz,"
        " UNIQUE (run_id, step))"
    )
    asleep = anyio.Event()
    await db.add_listener(f"{schema}_asleep", lambda *_: asleep.set())
    nap = 1.5
    async with make_coop(worker=False) as coop:
        async with WorkerProcess(dsn, schema, APP) as first:
            handle = await coop.launch("nap", {"seconds": nap})
            with anyio.fail_after(WAIT):
                await asleep.wait()
            if stop == "sigkill":
                await first.kill()
            # else: leaving the block sends SIGTERM and waits for a clean exit
        stopped_at = await db_now(db)
        assert first.process is not None
        assert first.process.returncode == (0 if stop == "sigterm" else -9)
        async with WorkerProcess(dsn, schema, APP) as second:
            outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "committed", outcome.failure
    rows = {row["step"]: row for row in await db.fetch("SELECT step, pid, at FROM steps")}
    assert sorted(rows) == ["doze", "wake"]
    assert rows["doze"]["pid"] == first.pid
    assert rows["wake"]["pid"] == second.pid
    wake_due = rows["doze"]["at"] + timedelta(seconds=nap)
    assert stopped_at < wake_due  # the first worker was gone while the run slept
    assert rows["wake"]["at"] >= wake_due
    assert of_saga(events, "nap") == [
        ("SEEN", None),
        ("SUSPENDED", "doze"),
        ("SUSPENDED", "wake"),
        ("COMMITTED", "wake"),
    ]
    workers = [e.worker for e in events if e.type == "SUSPENDED"]
    assert workers[0] != workers[1]


async def test_a_far_timer_does_not_stop_a_poll_only_worker_from_polling(
    make_coop: MakeCoop,
) -> None:
    """A poll-only worker that knows of a launch due in 60 s still polls every
    `poll_interval` and finds a run launched by another process right away."""
    served = Saga("served")
    add_step(served, "serve")
    timer = Saga("timer")
    add_step(timer, "ring")

    async with (
        make_coop(listen=False) as coop,
        make_coop(listen=False, worker=False) as elsewhere,
    ):
        coop.subscribe("served", served)
        coop.subscribe("timer", timer)
        await coop.sync()
        await coop.launch("timer", {}, after=60)
        # Due in 1 s, launched by another process: only this worker's poll can find it.
        handle = await elsewhere.launch("served", {}, after=1.0)
        outcome = await coop.wait(handle.id, timeout=3.0)  # 1 s + 8 poll intervals

    assert outcome.status == "committed"
