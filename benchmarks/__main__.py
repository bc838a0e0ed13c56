"""`python -m benchmarks`: run scoopy's benchmark suite, print a table, write a JSON file.

python -m benchmarks                  # everything, about 4-5 minutes on 2 cores
python -m benchmarks --quick          # every figure, smaller sizes, under 2 minutes
python -m benchmarks --only flat,fanout --reps 1
python -m benchmarks --dsn postgresql://user:pw@host/db --json out.json
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import structlog

from scoopy.postgres import POSTGRES_VERSION, default_data_dir, embedded_dsn

from . import pg, report, settings
from .machine import CpuMeter
from .suite import REQUIRED, Suite


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(settings.WORKLOADS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(settings.WORKLOADS)}"
        )
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one repetition")
    parser.add_argument("--dsn", help="PostgreSQL to use (default: a private embedded server)")
    parser.add_argument(
        "--pgdata",
        type=Path,
        default=default_data_dir().parent / f"bench-pg{POSTGRES_VERSION}",
        help="data directory of the embedded server (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, help="where to write the results")
    parser.add_argument("--only", type=_names, help="comma-separated workloads to run")
    parser.add_argument("--skip", type=_names, default=[], help="workloads not to run")
    parser.add_argument("--reps", type=_positive, help="repetitions of each figure")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=_positive, help="steps in flight (default 16)")
    parser.add_argument("--history-runs", type=_positive, help="finished runs loaded for `history`")
    return parser


async def _main(args: argparse.Namespace) -> int:
    chosen = settings.build(
        args.quick,
        seed=args.seed,
        reps=args.reps,
        concurrency=args.concurrency,
        history_runs=args.history_runs,
    )
    random.seed(chosen.seed)
    selected = [name for name in (args.only or settings.WORKLOADS) if name not in args.skip]
    if args.dsn:
        dsn = args.dsn
    else:
        # A private server: the tests' embedded server may be restarted under our feet.
        dsn = await anyio.to_thread.run_sync(embedded_dsn, args.pgdata)
    env = report.environment(await pg.server_facts(dsn))
    env["server"] = "external (--dsn)" if args.dsn else f"embedded, {args.pgdata}"
    print(report.header(env, chosen.as_dict()), flush=True)
    print(f"workloads {', '.join(selected)}\n", flush=True)

    postmaster = env["postgresql"].pop("postmaster_pid")  # "": the server is elsewhere
    meter = CpuMeter([os.getpid()] + ([int(postmaster)] if postmaster else []))
    env["server_on_this_host"] = bool(postmaster)

    started = time.perf_counter()
    results = await Suite(dsn, chosen, selected, meter).run()
    elapsed = time.perf_counter() - started

    figures = list(results.figures.values())
    print()
    print(report.table(figures))
    disturbed = {
        name: cpu["others_share"] for name, cpu in results.cpu.items() if cpu["others_share"] > 0.05
    }
    if disturbed:
        print(
            "\nother processes on this machine used CPU during: "
            + ", ".join(f"{name} {share:.0%}" for name, share in disturbed.items())
            + " (share of all cores; see cpu in the JSON)"
        )
    for name, error in results.errors.items():
        print(f"\n{name} failed: {error}")
    print(f"\ntotal {elapsed:.0f} s")

    document: dict[str, Any] = {key: results.figures[key].value for key in REQUIRED}
    document.update(
        {
            "figures": {fig.key: fig.as_dict() for fig in figures},
            "details": results.details,
            "errors": results.errors,
            "environment": env,
            "settings": chosen.as_dict(),
            "workloads": selected,
            "workload_seconds": results.seconds,
            "cpu": results.cpu,
            "others_cpu_share_per_measurement": results.others_per_rep,
            "total_seconds": elapsed,
            "loadavg_at_end": list(os.getloadavg()),
        }
    )
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = args.json or Path("bench-results") / f"scoopy-bench-{stamp}.json"
    report.write_json(path, document)
    print(f"results written to {path}")
    return 1 if results.errors else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The engine logs every step at info; the benchmark wants its warnings only.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    return int(anyio.run(_main, args))


if __name__ == "__main__":
    sys.exit(main())
