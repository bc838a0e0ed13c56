"""The DBOS side of the comparison: the same parent-with-one-child hierarchy as DBOS workflows.

A parent workflow runs one step, starts a child workflow and waits for its result; the
child runs one step. That mirrors scoopy's pair: a parent saga whose one step launches a
one-step child saga, the parent finishing once the child has. Both sides are driven the
same way: `concurrency` clients, each starting a hierarchy and awaiting its result, after
a warm-up, on fresh tables left to PostgreSQL's defaults.

DBOS keeps a process-wide singleton with background threads, so each repetition runs in
its own subprocess (`python -m benchmarks.dbos_bench`) against a database of its own,
created and dropped by the harness: nothing of it is alive while scoopy is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import anyio

from .pg import fresh_database

ROOT = Path(__file__).resolve().parent.parent  # so that `-m benchmarks...` imports


def dbos_version() -> str | None:
    try:
        return version("dbos")
    except PackageNotFoundError:
        return None


@dataclass(frozen=True, slots=True)
class DbosResult:
    hierarchies: int
    seconds: float
    launch_seconds: float

    @property
    def per_s(self) -> float:
        return self.hierarchies / self.seconds


async def run(
    dsn: str, hierarchies: int, concurrency: int, warmup: int, pool_size: int, timeout: float
) -> DbosResult:
    """One repetition in a fresh subprocess and a fresh database."""
    async with fresh_database(dsn, "dbos") as url:
        command = [
            sys.executable, "-m", "benchmarks.dbos_bench",
            "--url", url,
            "--hierarchies", str(hierarchies),
            "--concurrency", str(concurrency),
            "--warmup", str(warmup),
            "--pool-size", str(pool_size),
        ]  # fmt: skip
        with anyio.fail_after(timeout):
            done = await anyio.run_process(command, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(
            f"the DBOS benchmark failed ({done.returncode}): {done.stderr.decode()[-2000:]}"
        )
    result = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return DbosResult(result["hierarchies"], result["seconds"], result["launch_seconds"])


# -- the subprocess ----------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dbos_bench")
    parser.add_argument("--url", required=True, help="postgresql:// URL of DBOS's own database")
    parser.add_argument("--hierarchies", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--pool-size", type=int, default=20)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.getLogger("dbos").setLevel(logging.WARNING)
    from dbos import DBOS

    DBOS(
        config={
            "name": "scoopy-bench",
            "system_database_url": args.url,
            "dbos_system_schema": "dbos",
            "sys_db_pool_size": args.pool_size,
            "log_level": "WARNING",
            "application_version": "bench",  # no source hashing; a stable recovery key
            "executor_id": "bench",
        }
    )

    async def _touch(x: int) -> int:
        return x + 1

    touch = DBOS.step()(_touch)

    async def _child(x: int) -> int:
        result: int = await touch(x)
        return result

    child = DBOS.workflow()(_child)

    async def _parent(x: int) -> int:
        await touch(x)
        handle = await DBOS.start_workflow_async(child, x)
        result: int = await handle.get_result()
        return result

    parent = DBOS.workflow()(_parent)

    async def drive(count: int, offset: int) -> float:
        cursor = 0

        async def client() -> None:
            nonlocal cursor
            while cursor < count:
                index = offset + cursor
                cursor += 1
                handle = await DBOS.start_workflow_async(parent, index)
                result: Any = await handle.get_result()
                if result != index + 1:
                    raise RuntimeError(f"hierarchy {index} returned {result!r}")

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        return time.perf_counter() - started

    launched = time.perf_counter()
    DBOS.launch()
    launch_seconds = time.perf_counter() - launched
    try:

        async def both() -> float:
            await drive(args.warmup, 10_000_000)
            return await drive(args.hierarchies, 0)

        seconds = asyncio.run(both())
    finally:
        DBOS.destroy(destroy_registry=True)
    print(
        json.dumps(
            {
                "hierarchies": args.hierarchies,
                "seconds": seconds,
                "launch_seconds": launch_seconds,
                "dbos_version": dbos_version(),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
