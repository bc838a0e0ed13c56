"""Profile the engine during a workload's timed window only, with py-spy.

    python -m benchmarks.profiling flat --roots 30000 --seconds 10
    python -m benchmarks.profiling fanout --roots 6000 --seconds 10 --out fanout.txt

Sets up a backlog exactly as the timed runs do, then starts `py-spy record` on this
process at `resume`, so launching and setup stay out of the samples. `--gil` keeps only
samples where the event loop thread holds the GIL: Python work, not time blocked in a
system call or waiting for a CPU on a busy host. The collapsed stacks are summarised by
component and by function; pass `--out` to keep them (flamegraph.pl or speedscope.app
read them). Needs `pip install py-spy` and ptrace permission.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import anyio
import structlog

from scoopy.postgres import POSTGRES_VERSION, default_data_dir, embedded_dsn

from . import workloads
from .pg import fresh_schema
from .settings import build

SHAPES = {
    "flat": workloads.FLAT,
    "one_step": workloads.ONE_STEP,
    "fanout": workloads.FANOUT,
    "deep": workloads.DEEP,
}
_FRAME = re.compile(r"(?P<func>.*) \((?P<path>.*):\d+\)$")


def _frame(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["path"]
    for marker in ("site-packages/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
    path = path.replace(str(Path(__file__).resolve().parent.parent) + "/", "")
    return f"{match['func']} ({path})"


COMPONENTS = (
    ("scoopy/engine/", "scoopy engine"),
    ("scoopy/", "scoopy (rest)"),
    ("asyncpg/", "asyncpg"),
    ("asyncio/", "asyncio loop and transports"),
    ("selectors.py", "asyncio loop and transports"),
    ("anyio/", "anyio"),
    ("structlog/", "structlog"),
    ("msgspec", "msgspec"),
    ("benchmarks/", "benchmark harness"),
)


def component(frame: str) -> str:
    for marker, name in COMPONENTS:
        if marker in frame:
            return name
    return "other (stdlib, builtins)"


def summarise(collapsed: str, top: int = 20) -> str:
    """Shares of py-spy's samples (raw/collapsed format) by component and by function."""
    total = 0
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        for name in set(frames):
            inclusive[name] += n
        own[frames[-1]] += n
        parts[component(frames[-1])] += n
    if not total:
        return "no samples"

    def share(counter: Counter[str], keep: int, only: str = "") -> list[str]:
        chosen = [(name, n) for name, n in counter.most_common() if only in name][:keep]
        return [f"  {100 * n / total:5.1f}%  {name}" for name, n in chosen]

    return "\n".join(
        [
            f"{total} samples (event loop thread holding the GIL)",
            "",
            "self time by component:",
            *share(parts, len(parts)),
            "",
            "scoopy functions, inclusive (coroutine stacks are sometimes cut short):",
            *share(inclusive, top, only="(scoopy/"),
            "",
            "functions, self time:",
            *share(own, top),
        ]
    )


async def _profile(args: argparse.Namespace, py_spy: str) -> None:
    settings = build(False)
    shape = SHAPES[args.shape]
    dsn = args.dsn or await anyio.to_thread.run_sync(embedded_dsn, args.pgdata)
    subscriptions = shape.subscriptions(settings.concurrency)
    async with (
        fresh_schema(dsn, "profile") as schema,
        workloads.session(dsn, schema, settings, subscriptions) as s,
    ):
        await workloads.backlog(
            s, shape.topic, shape.root_saga, settings.warmup, shape.runs_each, shape.steps_each
        )
        await s.coop.pause(shape.root_saga)
        roots = await workloads.launch_many(s.coop, shape.topic, args.roots, settings, s.launched)
        await workloads.refresh_statistics(s)  # as `backlog` does before its clock starts
        s.watch.expect(roots)
        command = [
            py_spy, "record", "--pid", str(os.getpid()), "--duration", str(args.seconds),
            "--rate", str(args.rate), "--nonblocking", "--gil", "--format", "raw",
            "-o", str(args.out),
        ]  # fmt: skip
        async with await anyio.open_process(command) as spy:
            started = time.perf_counter()
            cpu = time.process_time()
            await s.coop.resume(shape.root_saga)
            await spy.wait()
            cores = (time.process_time() - cpu) / (time.perf_counter() - started)
            finished = await s.watch.all_done(settings.timeout)
        elapsed = finished - started
        print(
            f"{args.shape}: {args.roots} hierarchies in {elapsed:.1f} s, "
            f"{args.roots * shape.steps_each / elapsed:,.0f} steps/s; "
            f"this process used {cores:.2f} cores while sampled ({args.seconds} s)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profiling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--roots", type=int, default=30_000, help="outlast --seconds")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--out", type=Path, help="keep the collapsed stacks here")
    parser.add_argument("--dsn")
    parser.add_argument(
        "--pgdata", type=Path, default=default_data_dir().parent / f"bench-pg{POSTGRES_VERSION}"
    )
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        parser.error("py-spy is not installed: pip install py-spy")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory() as tmp:
        keep = args.out is not None
        args.out = args.out or Path(tmp) / "stacks.txt"
        anyio.run(_profile, args, py_spy)
        print(summarise(args.out.read_text()))
        if keep:
            print(f"\ncollapsed stacks in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
