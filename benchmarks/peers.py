"""What the job-queue peers (PgQueuer, Procrastinate) share: their subprocess, their window.

Each repetition of a peer runs in a subprocess (`python -m benchmarks.<peer>_bench`) on a
database of its own, created and dropped by the harness, like the DBOS comparison. The
subprocess installs the peer's schema, drains an unmeasured warm-up batch, bulk-enqueues
the measured jobs, ANALYZEs its tables (as the scoopy backlog workloads do once their
backlog is queued), and only then starts the clock: a `Window` around the drain. It
prints one JSON line: items, seconds, its own CPU time and the server's over the window.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import asyncpg

from .machine import CpuMeter, process_cpu_seconds
from .pg import fresh_database

ROOT = Path(__file__).resolve().parent.parent  # so that `-m benchmarks...` imports


RAW = ("system", "items", "seconds", "cpu_seconds", "server_cpu_seconds")
DERIVED = (
    "per_s",
    "cpu_us_per_item",
    "server_cpu_us_per_item",
    "worker_cores_busy",
    "server_cores_busy",
)


@dataclass(frozen=True, slots=True)
class Drained:
    """One timed drain: `items` finished in `seconds`; CPU seconds of the draining process
    and of the PostgreSQL server (all its processes) over the same window."""

    system: str
    items: int
    seconds: float
    cpu_seconds: float
    server_cpu_seconds: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def per_s(self) -> float:
        return self.items / self.seconds

    @property
    def cpu_us_per_item(self) -> float:
        return self.cpu_seconds / self.items * 1e6

    @property
    def server_cpu_us_per_item(self) -> float | None:
        if self.server_cpu_seconds is None:
            return None
        return self.server_cpu_seconds / self.items * 1e6

    def describe(self) -> dict[str, Any]:
        server = self.server_cpu_seconds
        return {
            "system": self.system,
            "items": self.items,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "server_cpu_seconds": server,
            "per_s": self.per_s,
            "cpu_us_per_item": self.cpu_us_per_item,
            "server_cpu_us_per_item": self.server_cpu_us_per_item,
            "worker_cores_busy": self.cpu_seconds / self.seconds,
            "server_cores_busy": None if server is None else server / self.seconds,
            **self.extra,
        }

    @classmethod
    def parse(cls, found: dict[str, Any]) -> Drained:
        extra = {key: value for key, value in found.items() if key not in RAW + DERIVED}
        return cls(
            found["system"],
            found["items"],
            found["seconds"],
            found["cpu_seconds"],
            found["server_cpu_seconds"],
            extra,
        )


class Window:
    """`with Window(pids, postmaster) as w:` wall clock and CPU seconds of the processes
    `pids` and of the server's process tree (when it runs on this host) from entry to exit,
    or to `w.end` (a `time.perf_counter()` value) when the caller knows a better end.

    Both CPU figures are the kernel's user + system time, read from /proc. The server's
    tree is walked once at each end, outside the clock.
    """

    def __init__(self, pids: list[int], postmaster: int | None) -> None:
        self.pids = pids
        self.server = CpuMeter([postmaster]) if postmaster else None
        self.started = 0.0
        self.end: float | None = None
        self.seconds = 0.0
        self.cpu_by_pid: list[float] = []
        self.server_cpu_seconds: float | None = None

    @property
    def cpu_seconds(self) -> float:
        return sum(self.cpu_by_pid)

    def __enter__(self) -> Window:
        self._server = self.server.sample().ours if self.server else 0
        self._cpu = [process_cpu_seconds(pid) for pid in self.pids]
        self.started = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.seconds = (self.end or time.perf_counter()) - self.started
        self.cpu_by_pid = [
            process_cpu_seconds(pid) - before
            for pid, before in zip(self.pids, self._cpu, strict=True)
        ]
        if self.server is not None:
            ticks = self.server.sample().ours - self._server
            self.server_cpu_seconds = ticks / CpuMeter.ticks_per_second()

    def drained(self, system: str, items: int, **extra: Any) -> Drained:
        return Drained(
            system, items, self.seconds, self.cpu_seconds, self.server_cpu_seconds, extra
        )


async def analyze(conn: asyncpg.Connection[Any]) -> None:
    """ANALYZE the whole database the connection is on (the peer's own)."""
    await conn.execute("ANALYZE")


def report(drained: Drained, version: str | None) -> None:
    """The subprocess's last line of output: what `run` parses."""
    print(json.dumps({**drained.describe(), "version": version}), flush=True)


async def run(module: str, dsn: str, kind: str, args: list[str], timeout: float) -> Drained:
    """One repetition of a peer: `python -m benchmarks.<module> --url <fresh db> ...args`."""
    async with fresh_database(dsn, kind) as url:
        command = [sys.executable, "-m", f"benchmarks.{module}", "--url", url, *args]
        with anyio.fail_after(timeout):
            done = await anyio.run_process(command, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(
            f"the {kind} benchmark failed ({done.returncode}): {done.stderr.decode()[-2000:]}"
        )
    return Drained.parse(json.loads(done.stdout.decode().strip().splitlines()[-1]))
