"""Load and progress helpers for tests that run tests.apps.orders under faults."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

import anyio
import asyncpg

from scoopy import Cooperation

from ..apps import orders
from .fixtures import connect
from .workers import WorkerFleet

APP = "tests.apps.orders:setup"


async def make_tables(dsn: str, schema: str) -> None:
    conn = await connect(dsn, schema)
    try:
        await conn.execute(orders.TABLE)
    finally:
        await conn.close()


async def count_effects(dsn: str, schema: str) -> int | None:
    """Rows in the business table, or None while the database does not answer."""
    try:
        conn = await connect(dsn, schema)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return None
    try:
        return int(await conn.fetchval("SELECT count(*) FROM effect"))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return None
    finally:
        await conn.close()


async def launch_orders(coop: Cooperation, numbers: Sequence[int]) -> dict[int, uuid.UUID]:
    """Launch one order hierarchy per number (fail modes per `orders.fail_mode`)."""
    roots: dict[int, uuid.UUID] = {}
    for n in numbers:
        roots[n] = (await coop.launch("orders", orders.payload(n))).id
    return roots


def describe_exits(fleet: WorkerFleet) -> str:
    return "\n".join(
        f"worker {e.worker} (pid {e.pid}) exited with {e.returncode}; its last output:\n"
        f"{e.output_tail}"
        for e in fleet.unexpected_exits()
    )


async def progress_resumes(
    fleet: WorkerFleet,
    dsn: str,
    schema: str,
    *,
    more: int,
    within: float,
    stable_for: float = 0.0,
) -> float:
    """Wait until `more` new business rows appear; return how long that took (seconds).

    Fails at once, with their output, if a worker process exits by itself meanwhile, and
    after `within` seconds if the work does not go on. With `stable_for`, it also watches
    the workers that long at least (a worker that dies a moment after the fault, once its
    dead connection is next used, is caught).
    """
    started = time.monotonic()
    baseline: int | None = None
    deadline = started + within
    while True:  # the database notifies nobody of business rows: re-ask
        exits = describe_exits(fleet)
        if exits:
            raise AssertionError(f"a worker process died:\n{exits}")
        count = await count_effects(dsn, schema)
        if count is not None:
            if baseline is None:
                baseline = count
            elif count >= baseline + more:
                took = time.monotonic() - started
                if took >= stable_for:
                    return took
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no progress within {within} s (rows: {baseline} -> {count}); "
                f"workers alive: {fleet.alive()}"
            )
        await anyio.sleep(0.05)


async def outcomes(
    coop: Cooperation, roots: dict[int, uuid.UUID], timeout: float
) -> dict[int, str | None]:
    """Each order's outcome status, waiting up to `timeout` in all (None: unfinished)."""
    statuses: dict[int, str | None] = dict.fromkeys(roots)
    deadline = time.monotonic() + timeout
    for n, root in roots.items():
        left = deadline - time.monotonic()
        try:
            statuses[n] = (await coop.wait(root, timeout=max(left, 0.5))).status
        except TimeoutError:
            statuses[n] = None
    return statuses


async def effects(dsn: str, schema: str) -> list[tuple[int, str, str, str]]:
    conn = await connect(dsn, schema)
    try:
        rows = await conn.fetch("SELECT order_id, saga, step, kind FROM effect")
    finally:
        await conn.close()
    return [(row["order_id"], row["saga"], row["step"], row["kind"]) for row in rows]
