"""The `scoopy` command line."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import asyncpg
import pytest

from scoopy import Cooperation, Message, Saga, Scope
from scoopy.cli import UsageError, app_cooperation, build_parser

from .helpers import ROOT, WAIT, WorkerProcess, eventually


def scoopy(*args: str, dsn: str, schema: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scoopy", "--dsn", dsn, "--schema", schema, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=WAIT,
        check=False,
    )


@pytest.mark.parametrize(
    ("app", "message"),
    [
        ("no_colon_here", "APP must look like 'module:attribute'"),
        (":attribute", "APP must look like 'module:attribute'"),
        ("no_such_module_anywhere:app", "cannot import module 'no_such_module_anywhere'"),
        ("tests.apps.workers:missing", "module 'tests.apps.workers' has no attribute 'missing'"),
        ("tests.apps.workers:work", "must name a Cooperation"),
        ("tests.apps.workers:subscribes_nothing", "subscribed no sagas"),
    ],
)
def test_bad_app_strings_are_clear_errors(app: str, message: str) -> None:
    args = build_parser().parse_args(["--dsn", "postgresql://unused/x", "worker", app])
    with pytest.raises(UsageError, match=message):
        app_cooperation(args)


def test_worker_with_a_bad_app_exits_with_a_usage_error(dsn: str, schema: str) -> None:
    result = scoopy("worker", "nope:app", dsn=dsn, schema=schema)
    assert result.returncode == 2
    assert "scoopy: error: cannot import module 'nope'" in result.stderr


async def test_launch_trace_tree_undo_from_the_command_line(
    dsn: str,
    schema: str,
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
) -> None:
    await db.execute("CREATE TABLE work (run_id uuid, step text, pid int, UNIQUE (run_id, step))")
    migrated = await anyio.to_thread.run_sync(lambda: scoopy("migrate", dsn=dsn, schema=schema))
    assert migrated.returncode == 0, migrated.stderr
    assert "is at version" in migrated.stdout

    async with WorkerProcess(dsn, schema, "tests.apps.workers:setup") as worker:
        launched = await anyio.to_thread.run_sync(
            lambda: scoopy(
                "launch", "work", '{"n": 1}', "--wait", "--timeout", "30", dsn=dsn, schema=schema
            )
        )
        assert launched.returncode == 0, launched.stderr
        root, status = launched.stdout.split()
        assert status == "committed"
        trace = await anyio.to_thread.run_sync(
            lambda: scoopy("trace", root, dsn=dsn, schema=schema)
        )
        assert [line.split()[2] for line in trace.stdout.splitlines()] == [
            "EMITTED", "SEEN", "SUSPENDED", "SUSPENDED", "COMMITTED",
        ]  # fmt: skip
        tree = await anyio.to_thread.run_sync(lambda: scoopy("tree", root, dsn=dsn, schema=schema))
        assert tree.stdout.startswith("work [") and "committed" in tree.stdout
        undo = await anyio.to_thread.run_sync(
            lambda: scoopy(
                "rollback", root, "--reason", "customer changed mind", dsn=dsn, schema=schema
            )
        )
        assert undo.returncode == 0, undo.stderr
        async with make_coop(worker=False) as coop:
            outcome = await coop.handle(root).wait(timeout=WAIT)
        assert outcome.status == "rolled_back"
        assert outcome.failure is not None and outcome.failure.message == "customer changed mind"
        again = await anyio.to_thread.run_sync(
            lambda: scoopy("rollback", root, dsn=dsn, schema=schema)
        )
        assert again.returncode == 2
        assert "only committed runs can be undone" in again.stderr
    assert b"worker started" in worker.output


async def test_json_logs_carry_the_ids(
    dsn: str,
    schema: str,
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
) -> None:
    await db.execute("CREATE TABLE work (run_id uuid, step text, pid int, UNIQUE (run_id, step))")
    worker = WorkerProcess(dsn, schema, "tests.apps.workers:setup")
    worker.args[worker.args.index("--log-level") : worker.args.index("--log-level")] = [
        "--log-format", "json",
    ]  # fmt: skip
    worker.args[worker.args.index("--log-level") + 1] = "debug"
    async with worker, make_coop(worker=False) as coop:
        handle = await coop.launch("work", {})
        assert (await handle.wait(timeout=WAIT)).status == "committed"
        await worker.wait_for(b'"COMMITTED"')
    lines = [
        json.loads(line) for line in worker.output.decode().splitlines() if line.startswith("{")
    ]
    committed = [line for line in lines if line["event"] == "COMMITTED"]
    assert committed, lines
    entry = committed[0]
    assert entry["saga"] == "work" and entry["root_id"] == str(handle.id)
    assert entry["run_id"] and entry["worker"] and entry["lineage"][0] == str(handle.id)
    assert entry["level"] == "info" and "timestamp" in entry


async def test_cancel_from_the_command_line_rolls_a_suspended_hierarchy_back(
    dsn: str, schema: str, make_coop: Callable[..., Cooperation]
) -> None:
    """`scoopy cancel ROOT` on a hierarchy asleep between its steps: the run gives up, its
    compensation runs and it rolls back with the reason given; asking again says so, and an
    unknown id is a clear error."""
    log: list[str] = []
    report = Saga("report")

    @report.step()
    async def reserve_cluster(scope: Scope, message: Message[Any]) -> None:
        log.append("reserve")
        await scope.sleep(3600)

    @reserve_cluster.rollback
    async def release_cluster(scope: Scope, message: Message[Any], failure: BaseException) -> None:
        log.append(f"release after {type(failure).__name__}")

    @report.step()
    async def render(scope: Scope, message: Message[Any]) -> None:
        log.append("never: cancelled while asleep")

    async with make_coop() as coop:
        coop.subscribe("reports", report)
        handle = await coop.launch("reports", {})

        async def asleep() -> bool:
            return any(e.type == "SUSPENDED" for e in await coop.events(handle.id))

        await eventually(asleep)
        cancel = await anyio.to_thread.run_sync(
            lambda: scoopy(
                "cancel", str(handle.id), "--reason", "the customer left", dsn=dsn, schema=schema
            )
        )
        assert cancel.returncode == 0, cancel.stderr
        assert cancel.stdout.strip() == "cancellation requested"
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)
        again = await anyio.to_thread.run_sync(
            lambda: scoopy("cancel", str(handle.id), dsn=dsn, schema=schema)
        )
        unknown = await anyio.to_thread.run_sync(
            lambda: scoopy("cancel", str(uuid.uuid4()), dsn=dsn, schema=schema)
        )

    assert outcome.status == "rolled_back"
    assert log == ["reserve", "release after GaveUp"]
    assert outcome.failure is not None
    assert outcome.failure.message == "Gave up: the customer left"
    assert [each.type for each in outcome.failure.walk()] == [
        "scoopy.GaveUp", "scoopy.CancellationRequested",
    ]  # fmt: skip
    [request] = [e for e in events if e.type == "CANCELLATION_REQUESTED"]
    assert request.failure is not None and request.failure.message == "the customer left"
    assert [(e.type, e.step) for e in events if e.saga == "report"] == [
        ("SEEN", None),
        ("SUSPENDED", "reserve_cluster"),
        ("ROLLING_BACK", "render"),
        ("SUSPENDED", "Rollback of reserve_cluster (rolling back child scopes)"),
        ("SUSPENDED", "Rollback of reserve_cluster"),
        ("ROLLED_BACK", "Rollback of reserve_cluster"),
    ]
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "cancellation was already requested"
    assert unknown.returncode == 2
    assert "scoopy: error: no run or root message" in unknown.stderr
