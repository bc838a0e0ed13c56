"""The PgQueuer side of the job-queue comparison: N no-op jobs drained by one process.

The subprocess installs PgQueuer's schema (its default durability: every table logged) in
its own database, drains a warm-up batch, enqueues the measured jobs with one bulk
`Queries.enqueue` call, ANALYZEs, and times `QueueManager.run(mode=drain)` of `managers`
queue managers, each on a connection of its own (as PgQueuer's own drain benchmark runs
several "dequeue" managers in one process), from the call until every manager returned:
the queue is empty, every job ran and its completion was written to PgQueuer's log.
The batch size and the managers are tuned for PgQueuer's best figure on this machine
(`Settings.pgqueuer_*`; see the README).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

import asyncpg

from . import peers
from .report import package_version


async def _drain(url: str, jobs: int, args: argparse.Namespace) -> peers.Drained:
    """Enqueue `jobs` no-op jobs in bulk, then drain them, timed."""
    from pgqueuer import AsyncpgDriver, Queries, QueueManager
    from pgqueuer.models import Job
    from pgqueuer.types import QueueExecutionMode

    ran = 0
    last = 0.0  # when the last job ran; its completion is written (batched) after that
    connections = [await asyncpg.connect(url) for _ in range(args.managers)]
    try:

        async def noop(job: Job) -> None:
            nonlocal ran, last
            ran += 1
            last = time.perf_counter()

        managers = []
        for conn in connections:
            qm = QueueManager(Queries(AsyncpgDriver(conn)))
            qm.entrypoint("noop")(noop)
            managers.append(qm)
        queries = Queries(AsyncpgDriver(connections[0]))
        await queries.enqueue(["noop"] * jobs, [None] * jobs, [0] * jobs)
        await peers.analyze(connections[0])
        with peers.Window([os.getpid()], args.postmaster or None) as window:
            await asyncio.gather(
                *(
                    qm.run(
                        batch_size=args.batch_size,
                        mode=QueueExecutionMode.drain,
                        max_concurrent_tasks=args.max_concurrent or None,
                    )
                    for qm in managers
                )
            )
        left = await connections[0].fetchval("SELECT count(*) FROM pgqueuer")
        if ran != jobs or left:
            raise RuntimeError(f"{ran} of {jobs} jobs ran, {left} left in the queue")
        return window.drained(
            "pgqueuer",
            jobs,
            last_job_seconds=last - window.started,
            batch_size=args.batch_size,
            managers=args.managers,
            max_concurrent_tasks=args.max_concurrent or None,
        )
    finally:
        for conn in connections:
            await conn.close()


async def _main(args: argparse.Namespace) -> None:
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg.connect(args.url)
    try:
        await Queries(AsyncpgDriver(conn)).install()
    finally:
        await conn.close()
    await _drain(args.url, args.warmup, args)
    peers.report(await _drain(args.url, args.jobs, args), package_version("pgqueuer"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pgqueuer_bench")
    parser.add_argument("--url", required=True, help="postgresql:// URL of PgQueuer's database")
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--managers", type=int, default=1, help="queue managers (connections)")
    parser.add_argument("--max-concurrent", type=int, default=0, help="per manager; 0: none")
    parser.add_argument("--postmaster", type=int, default=0, help="server pid, for its CPU")
    args = parser.parse_args(argv)
    logging.getLogger("pgqueuer").setLevel(logging.WARNING)
    asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
