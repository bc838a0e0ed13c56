"""Backlogs drained by `python -m scoopy worker` processes, timed from the outside.

The scoopy side of the job-queue comparison (one-step roots, one worker process) and the
several-processes figure (the flat workload, 1, 2 or 4 worker processes) share one method,
the backlog method of `workloads` with the engine out of process:

1. a launcher (`Cooperation(worker=False)`, subscribed like the workers so that launches
   create runs) and the workers start; `warmup` roots per process are launched and
   awaited, so every worker is connected, has claimed work and is warm;
2. the root saga is paused, `count` roots are launched in bulk (`LAUNCHER_POOL`
   transactions, each launching its share; not timed), the schema ANALYZEd;
3. the clock starts, the saga is resumed, and the clock stops at the last hierarchy's
   `d:<root>` notification, heard by a listener of the harness (no query competes with
   the workers); the workers' CPU time (and the server's) is read from /proc around it;
4. one query checks that every run committed.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

from scoopy import Cooperation

from . import sagas
from .peers import Drained, Window
from .pg import fresh_schema
from .procs import WorkerProcess
from .settings import Settings
from .watch import ChannelWatch
from .workloads import (
    FLAT,
    ONE_STEP,
    PACED,
    Shape,
    analyze_schema,
    launch_in_transactions,
    launch_many,
    verify_roots,
)

# How many connections the launcher needs: it only launches, pauses and resumes. Kept
# small so that four workers (each `pool_size` connections and a listener) fit within
# the server's `max_connections`.
LAUNCHER_POOL = 4


async def backlog(
    dsn: str,
    settings: Settings,
    shape: Shape,
    app: str,
    count: int,
    processes: int,
    postmaster: int | None,
) -> Drained:
    """One repetition: `count` roots of `shape` drained by `processes` worker processes."""
    async with fresh_schema(dsn, shape.root_saga) as schema:
        launcher = Cooperation(dsn, schema=schema, worker=False, pool_size=LAUNCHER_POOL)
        sagas.subscribe(launcher, shape.subscriptions(settings.concurrency))
        async with launcher, ChannelWatch(dsn, launcher.store.channel) as watch:
            async with AsyncExitStack() as stack:
                workers = []
                for _ in range(processes):
                    worker = await stack.enter_async_context(
                        WorkerProcess(dsn, schema, app, settings)
                    )
                    await stack.enter_async_context(worker.alive())
                    workers.append(worker)
                warm = await launch_many(
                    launcher, shape.topic, settings.warmup * processes, settings
                )
                watch.expect(warm)
                await watch.all_done(settings.timeout)

                await launcher.pause(shape.root_saga)
                roots = await launch_in_transactions(
                    launcher, shape.topic, count, settings, LAUNCHER_POOL, first=len(warm)
                )
                await analyze_schema(dsn, schema)
                watch.expect(roots)
                with Window([w.pid for w in workers], postmaster) as window:
                    await launcher.resume(shape.root_saga)
                    window.end = await watch.all_done(settings.timeout)
            await verify_roots(dsn, schema, roots, shape.runs_each)
    return window.drained(
        "scoopy",
        count,
        processes=processes,
        steps=count * shape.steps_each,
        steps_per_s=count * shape.steps_each / window.seconds,
        cpu_seconds_by_process=window.cpu_by_pid,
    )


async def one_step(dsn: str, settings: Settings, count: int, postmaster: int | None) -> Drained:
    """The scoopy side of the job-queue comparison: one-step roots, one worker process."""
    return await backlog(
        dsn, settings, ONE_STEP, "benchmarks.sagas:one_step_setup", count, 1, postmaster
    )


async def paced(dsn: str, settings: Settings, processes: int, postmaster: int | None) -> Drained:
    """A saga under a rate limit (`sagas.PACED_RATE`/s) drained by `processes` processes."""
    count = sagas.PACED_RATE * settings.paced_seconds
    return await backlog(
        dsn, settings, PACED, "benchmarks.sagas:paced_setup", count, processes, postmaster
    )


async def flat(dsn: str, settings: Settings, processes: int, postmaster: int | None) -> Drained:
    """The flat workload (two-step roots) drained by `processes` worker processes."""
    return await backlog(
        dsn,
        settings,
        FLAT,
        "benchmarks.sagas:flat_setup",
        settings.flat_roots,
        processes,
        postmaster,
    )
