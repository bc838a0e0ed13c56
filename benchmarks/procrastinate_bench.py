"""The Procrastinate side of the job-queue comparison: N no-op jobs drained by its asyncio worker.

The subprocess applies Procrastinate's schema in its own database, drains a warm-up batch,
defers the measured jobs with one `batch_defer_async` call (one INSERT), ANALYZEs, and times
`App.run_worker_async(wait=False, concurrency=...)` from the call until it returned: the
worker found the queue empty and every job it had started finished (status `succeeded`,
rows kept: Procrastinate's default `delete_jobs="never"`). The connector is psycopg 3's
async pool with as many connections as scoopy's pool (`Settings.pool_size`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from typing import Any

import asyncpg

from . import peers
from .report import package_version


async def _main(args: argparse.Namespace) -> None:
    from procrastinate import App, PsycopgConnector

    app = App(
        connector=PsycopgConnector(
            conninfo=args.url, min_size=args.pool_size, max_size=args.pool_size
        )
    )
    ran = 0
    last = 0.0  # when the last job ran; the worker marks it succeeded after that

    async def _noop() -> None:
        nonlocal ran, last
        ran += 1
        last = time.perf_counter()

    noop = app.task(name="noop")(_noop)

    async def drain(conn: asyncpg.Connection[Any], jobs: int) -> peers.Drained:
        nonlocal ran
        ran = 0
        await noop.batch_defer_async(*({} for _ in range(jobs)))
        await peers.analyze(conn)
        with peers.Window([os.getpid()], args.postmaster or None) as window:
            await app.run_worker_async(
                concurrency=args.concurrency, wait=False, install_signal_handlers=False
            )
        left = await conn.fetchval(
            "SELECT count(*) FROM procrastinate_jobs WHERE status <> 'succeeded'"
        )
        if ran != jobs or left:
            raise RuntimeError(f"{ran} of {jobs} jobs ran, {left} did not succeed")
        return window.drained(
            "procrastinate",
            jobs,
            last_job_seconds=last - window.started,
            concurrency=args.concurrency,
            pool_size=args.pool_size,
        )

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        conn = await asyncpg.connect(args.url)
        try:
            await drain(conn, args.warmup)
            drained = await drain(conn, args.jobs)
        finally:
            await conn.close()
    peers.report(drained, package_version("procrastinate"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.procrastinate_bench")
    parser.add_argument("--url", required=True, help="postgresql:// URL of its database")
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--pool-size", type=int, default=20)
    parser.add_argument("--postmaster", type=int, default=0, help="server pid, for its CPU")
    args = parser.parse_args(argv)
    logging.getLogger("procrastinate").setLevel(logging.WARNING)
    asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
