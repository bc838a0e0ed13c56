"""Workloads that need a real worker process: its memory, and what it costs while idle.

The worker is `python -m scoopy worker benchmarks.sagas:<setup>`, the way it is deployed,
at log level warning. It logs nothing at that level when it starts, so readiness is
never read from its output: the memory workload waits for the database to show every
parent suspended, the idle workload for the worker's startup traffic on the relay.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.abc

from scoopy import Cooperation

from . import sagas
from .accounting import labels
from .dsn import address
from .pg import connect, fresh_schema
from .settings import Settings
from .watch import ChannelWatch
from .wire import Tally, WireTap
from .workloads import launch_many

ROOT = Path(__file__).resolve().parent.parent


def proc_status(pid: int) -> dict[str, int]:
    """The kB figures of /proc/<pid>/status (VmHWM is the peak resident set)."""
    figures: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            figures[key] = int(parts[0])
    return figures


class WorkerProcess:
    """`async with WorkerProcess(...)`: a scoopy worker subprocess, stopped with SIGTERM."""

    def __init__(self, dsn: str, schema: str, app: str, settings: Settings, **env: str) -> None:
        self.args = [
            sys.executable, "-m", "scoopy", "--dsn", dsn, "--schema", schema,
            "--log-level", "warning", "worker", app, "--pool-size", str(settings.pool_size),
        ]  # fmt: skip
        self.env = {
            **os.environ,
            sagas.INSTANCES_ENV: str(settings.concurrency),
            **env,
        }
        self.timeout = settings.timeout
        self.stderr = bytearray()
        self._eof = anyio.Event()
        self.process: anyio.abc.Process | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def status(self) -> dict[str, int]:
        if self.process is None or self.process.returncode is not None:
            raise RuntimeError(f"the worker exited: {self.stderr.decode(errors='replace')}")
        return proc_status(self.pid)

    async def __aenter__(self) -> WorkerProcess:
        self.process = await anyio.open_process(self.args, env=self.env, cwd=ROOT)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._drain)
        return self

    @asynccontextmanager
    async def alive(self) -> AsyncIterator[None]:
        """Fail the block at once, with the worker's output, if the worker exits during it."""
        assert self.process is not None
        process = self.process

        async def watch() -> None:
            await process.wait()
            with anyio.move_on_after(1):
                await self._eof.wait()  # the last of its output explains the exit
            output = self.stderr.decode(errors="replace")[-3000:]
            raise RuntimeError(f"the worker exited with {process.returncode}: {output}")

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            yield
            tg.cancel_scope.cancel()

    async def _drain(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.stderr += chunk
        self._eof.set()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self.process is not None and self._tg is not None
        with anyio.CancelScope(shield=True):
            if self.process.returncode is None:
                self.process.send_signal(signal.SIGTERM)
                with anyio.move_on_after(self.timeout):
                    await self.process.wait()
                if self.process.returncode is None:
                    self.process.kill()
                    await self.process.wait()
        # The drain task ends at EOF, which the exit just caused.
        await self._tg.__aexit__(None, None, None)


@dataclass(frozen=True, slots=True)
class MemoryResult:
    suspended: int
    peak_rss_kb: int
    rss_kb: int
    seconds: float  # from worker start to every parent suspended

    def describe(self) -> dict[str, Any]:
        return {
            "suspended_runs": self.suspended,
            "peak_rss_mb": self.peak_rss_kb / 1024,
            "rss_mb": self.rss_kb / 1024,
            "seconds_to_suspend_all": self.seconds,
        }


async def memory(dsn: str, settings: Settings) -> MemoryResult:
    """Peak RSS of a worker that has run and suspended `memory_runs` parents.

    Each parent's first step launches a child whose saga is subscribed (so the parent
    waits for it) but served by no process: the parent stays suspended for good.
    """
    count = settings.memory_runs
    async with fresh_schema(dsn, "memory") as schema:
        launcher = Cooperation(dsn, schema=schema, worker=False, pool_size=settings.pool_size)
        launcher.subscribe("mem", sagas.memory_parent(settings.concurrency))
        launcher.subscribe("mem_child", sagas.memory_child())
        q = f'"{schema}"'

        async def all_suspended() -> bool:
            conn = await connect(dsn)
            try:
                waiting = await conn.fetchval(
                    f"SELECT count(*) FROM {q}.run WHERE saga = 'mem_parent' "
                    "AND status = 'active' AND ready_at IS NULL AND pending = 1"
                )
            finally:
                await conn.close()
            return bool(waiting == count)

        async with launcher, ChannelWatch(dsn, launcher.store.channel) as watch:
            await launch_many(launcher, "mem", count, settings)
            started = anyio.current_time()
            async with (
                WorkerProcess(dsn, schema, "benchmarks.sagas:memory_setup", settings) as w,
                w.alive(),
            ):
                # Each parent's step notifies the child saga once, in its own commit.
                await watch.until(
                    lambda: watch.counts["r:mem_child"] >= count, all_suspended, settings.timeout
                )
                elapsed = anyio.current_time() - started
                figures = w.status()
    return MemoryResult(count, figures["VmHWM"], figures["VmRSS"], elapsed)


@dataclass(frozen=True, slots=True)
class IdleResult:
    sagas: int
    seconds: float
    polls: int
    window: Tally
    peak_rss_kb: int

    @property
    def round_trips_per_s(self) -> float:
        return self.window.total_round_trips / self.seconds

    def describe(self) -> dict[str, Any]:
        return {
            "sagas": self.sagas,
            "window_seconds": self.seconds,
            "poll_cycles": self.polls,
            "round_trips": self.window.total_round_trips,
            "round_trips_per_s": self.round_trips_per_s,
            "by_statement_per_s": {
                label: n / self.seconds for label, n in self.window.round_trips.most_common()
            },
            "notifications": self.window.notifications,
            "idle_worker_peak_rss_mb": self.peak_rss_kb / 1024,
        }


async def idle(dsn: str, settings: Settings) -> IdleResult:
    """Round trips per second of a worker serving `idle_sagas` sagas with nothing to do.

    Every round trip of the worker crosses the relay and is counted; the window runs from
    one of its poll round trips to the `idle_polls`-th next one, so it holds whole poll
    cycles (no rounding at the edges).
    """
    count = settings.idle_sagas
    async with fresh_schema(dsn, "idle") as schema:
        served = count + 1  # the engine also serves its own schedules saga
        async with (
            WireTap(address(dsn), labels(schema)) as tap,
            WorkerProcess(
                tap.dsn(dsn),
                schema,
                "benchmarks.sagas:idle_setup",
                settings,
                SCOOPY_BENCH_IDLE_SAGAS=str(count),
            ) as worker,
            worker.alive(),
        ):
            # Started: every saga has looked for work once and the poll loop has run.
            await tap.until(
                lambda t: t.executions["claim"] >= served and t.executions["poll"] >= 1,
                settings.timeout,
            )
            tap.mark_label = "poll"
            await tap.until(lambda t: len(tap.marks) > settings.idle_polls, settings.timeout)
            start_time, start = tap.marks[0]
            end_time, end = tap.marks[settings.idle_polls]
            peak = worker.status()["VmHWM"]
    return IdleResult(count, end_time - start_time, settings.idle_polls, end - start, peak)
