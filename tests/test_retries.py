"""Retries (`RetryPolicy`): failed attempts leave nothing, exhausted retries roll back with every
attempt's failure; a cancellation during a backoff stops the retries, a worker restart does not.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from scoopy import Message, RetryPolicy, Saga, Scope

from .apps.steps import add_step
from .helpers import WAIT, MakeCoop, WorkerProcess, both_modes, run_to_end, wait_for_event
from .reading import describe, failure_of, of_saga


class Flaky(Exception):
    """A failure worth retrying."""


class Fatal(Exception):
    """A failure not worth retrying."""


@both_modes
async def test_retried_step_succeeds_on_its_third_attempt(
    make_coop: MakeCoop, db: asyncpg.Connection[asyncpg.Record], listen: bool
) -> None:
    """Two ATTEMPT_FAILED, then the step commits; failed attempts' writes vanish."""
    await db.execute("CREATE TABLE attempt (n int)")
    attempts: list[int] = []
    saga = Saga("importer")

    @saga.step(retry=RetryPolicy(attempts=3, backoff=0.05, jitter=0))
    async def fetch(scope: Scope, message: Message[Any]) -> None:
        attempts.append(scope.attempt)
        await scope.connection.execute(
            f'INSERT INTO "{scope_schema}".attempt VALUES ($1)', scope.attempt
        )
        if scope.attempt < 3:
            raise Flaky(f"attempt {scope.attempt}")

    async with make_coop(listen=listen) as coop:
        scope_schema = coop.schema
        coop.subscribe("import", saga)
        handle = await coop.launch("import", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "committed", outcome.failure
    assert attempts == [1, 2, 3]
    assert [r["n"] for r in await db.fetch("SELECT n FROM attempt")] == [3]
    assert of_saga(events, "importer") == [
        ("SEEN", None),
        ("ATTEMPT_FAILED", "fetch"),
        ("ATTEMPT_FAILED", "fetch"),
        ("SUSPENDED", "fetch"),
        ("COMMITTED", "fetch"),
    ]
    failed = [describe(e.failure) for e in events if e.type == "ATTEMPT_FAILED"]
    assert failed == ['Flaky("attempt 1")', 'Flaky("attempt 2")']


@both_modes
async def test_exhausted_retries_report_every_attempt_and_roll_back(
    make_coop: MakeCoop, listen: bool
) -> None:
    """After the last attempt: RetriesExhausted with each attempt's failure, then rollback."""
    log: list[str] = []
    saga = Saga("importer")

    book = add_step(saga, "book")

    @book.rollback
    async def unbook(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append(f"unbook: {type(f).__name__}")

    @saga.step(retry=RetryPolicy(attempts=3, backoff=0.05, jitter=0))
    async def fetch(scope: Scope, message: Message[Any]) -> None:
        log.append(f"attempt {scope.attempt}")
        raise Flaky(f"attempt {scope.attempt}")

    _, outcome, events = await run_to_end(make_coop(listen=listen), [("import", saga)], "import")

    assert outcome.status == "rolled_back"
    assert log == ["attempt 1", "attempt 2", "attempt 3", "unbook: RetriesExhausted"]
    failure = outcome.failure
    assert failure is not None
    assert describe(failure) == (
        'RetriesExhausted(Flaky("attempt 1"), Flaky("attempt 2"), Flaky("attempt 3"))'
    )
    assert failure.message == "step 'fetch' failed after 3 attempts"
    assert of_saga(events, "importer") == [
        ("SEEN", None),
        ("SUSPENDED", "book"),
        ("ATTEMPT_FAILED", "fetch"),
        ("ATTEMPT_FAILED", "fetch"),
        ("ROLLING_BACK", "fetch"),
        ("SUSPENDED", "Rollback of book (rolling back child scopes)"),
        ("SUSPENDED", "Rollback of book"),
        ("ROLLED_BACK", "Rollback of book"),
    ]
    assert failure_of(events, "importer", "ROLLING_BACK") == failure


@both_modes
async def test_exception_outside_the_retry_policy_is_not_retried(
    make_coop: MakeCoop, listen: bool
) -> None:
    """Only exceptions listed in `on` are retried; others roll back on the first attempt."""
    attempts: list[int] = []
    saga = Saga("importer")

    @saga.step(retry=RetryPolicy(attempts=3, backoff=0.05, jitter=0, on=(Flaky,)))
    async def fetch(scope: Scope, message: Message[Any]) -> None:
        attempts.append(scope.attempt)
        raise Fatal("malformed input")

    _, outcome, events = await run_to_end(make_coop(listen=listen), [("import", saga)], "import")

    assert outcome.status == "rolled_back"
    assert attempts == [1]
    assert describe(outcome.failure) == 'Fatal("malformed input")'
    assert "ATTEMPT_FAILED" not in [e.type for e in events]


@both_modes
async def test_a_failure_after_retried_attempts_lists_every_attempt(
    make_coop: MakeCoop, listen: bool
) -> None:
    """An attempt that raises something the policy does not retry ends the retries, and the
    failure still records the earlier, retried attempts."""
    saga = Saga("importer")

    @saga.step(retry=RetryPolicy(attempts=3, backoff=0.05, jitter=0, on=(Flaky,)))
    async def fetch(scope: Scope, message: Message[Any]) -> None:
        if scope.attempt == 1:
            raise Flaky("timeout")
        raise Fatal("malformed input")

    _, outcome, _ = await run_to_end(make_coop(listen=listen), [("import", saga)], "import")

    assert outcome.status == "rolled_back"
    assert (
        describe(outcome.failure) == 'RetriesExhausted(Flaky("timeout"), Fatal("malformed input"))'
    )


@both_modes
async def test_cancellation_during_a_retry_backoff_stops_the_retries(
    make_coop: MakeCoop, listen: bool
) -> None:
    """A step waiting out its backoff gives up when cancelled instead of trying again."""
    attempts: list[int] = []
    saga = Saga("importer")

    @saga.step(retry=RetryPolicy(attempts=5, backoff=60, jitter=0))
    async def fetch(scope: Scope, message: Message[Any]) -> None:
        attempts.append(scope.attempt)
        raise Flaky("upstream down")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("import", saga)
        handle = await coop.launch("import", {})
        await wait_for_event(coop, handle.id, lambda e: e.type == "ATTEMPT_FAILED")
        await coop.cancel(handle.id, "stop trying")
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "rolled_back"
    assert attempts == [1]
    assert describe(outcome.failure) == 'GaveUp(CancellationRequested("stop trying"))'
    assert of_saga(events, "importer") == [
        ("SEEN", None),
        ("ATTEMPT_FAILED", "fetch"),
        ("ROLLING_BACK", "fetch"),
        ("ROLLED_BACK", "Rollback of fetch"),
    ]


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_a_retry_backoff_survives_a_worker_restart(
    dsn: str,
    schema: str,
    make_coop: MakeCoop,
    db: asyncpg.Connection[asyncpg.Record],
    stop: str,
) -> None:
    """The first attempt fails and the worker process stops during the backoff; a new worker
    runs the second attempt once the backoff is over: the step ran exactly twice (once per
    worker) and the hierarchy commits."""
    from .apps.retrying import BACKOFF

    app = "tests.apps.retrying:setup"
    await db.execute("CREATE TABLE attempts (run_id uuid, attempt int, pid int, at timestamptz)")
    async with make_coop(worker=False) as coop:
        async with WorkerProcess(dsn, schema, app) as first:
            handle = await coop.launch("sync", {})
            await wait_for_event(coop, handle.id, lambda e: e.type == "ATTEMPT_FAILED")
            if stop == "sigkill":
                await first.kill()
            # else: leaving the block sends SIGTERM and waits for a clean exit
        stopped_at = await db.fetchval("SELECT clock_timestamp()")
        assert first.process is not None
        assert first.process.returncode == (0 if stop == "sigterm" else -9)
        async with WorkerProcess(dsn, schema, app) as second:
            outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "committed", outcome.failure
    rows = await db.fetch("SELECT attempt, pid, at FROM attempts ORDER BY attempt")
    assert [(r["attempt"], r["pid"]) for r in rows] == [(1, first.pid), (2, second.pid)]
    first_try, second_try = (r["at"] for r in rows)
    assert (stopped_at - first_try).total_seconds() < BACKOFF  # stopped during the backoff
    assert (second_try - first_try).total_seconds() >= BACKOFF  # and the backoff was kept
    assert of_saga(events, "sync") == [
        ("SEEN", None),
        ("ATTEMPT_FAILED", "call_partner"),
        ("SUSPENDED", "call_partner"),
        ("COMMITTED", "call_partner"),
    ]
    [failed] = [e for e in events if e.type == "ATTEMPT_FAILED"]
    assert describe(failed.failure) == 'PartnerTimeout("partner API timed out")'
    writers = {e.type: int(str(e.worker).rsplit("/", 2)[1]) for e in events if e.saga == "sync"}
    assert writers["ATTEMPT_FAILED"] == first.pid
    assert writers["COMMITTED"] == second.pid
